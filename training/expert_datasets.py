"""Expert training data: one task's generated examples as LLaVA-style JSONL lines plus JPEG screenshots.

    python -m training.expert_datasets --kind calendar --train 2000 --eval 200 --seed 0 --output datasets/calendar

writes DIR/train.jsonl, DIR/eval.jsonl and DIR/images/<kind>_<NNNNN>.jpg (JPEG quality 90); train ids are
numbered 0 .. N-1 and eval ids continue at N, so ids and image files are unique across the two. A line:

    {"id": "calendar_00001", "image": "images/calendar_00001.jpg",
     "conversations": [{"from": "human", "value": "<image>\\n<prompt>"}, {"from": "gpt", "value": "<answer>"}],
     "adapter": "calendar", "metadata": {"task_type": "calendar", "target": {...}, "seed": 123...}}

Sample seeds: sample_seed(seed, split, index) is the first 8 bytes of SHA-256("<seed>:<split>:<index>"), so
train and eval (and any other split name) draw unrelated screens; a collision between two of them has a
probability of about 2**-64 per pair, and the tests check the splits are disjoint.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lora_router.configuration import ConfigError, check_types, parse_command, run_command
from lora_router.jsonl import read_jsonl, write_jsonl
from lora_router.progress import progress as progress_bar
from training.screens import KINDS
from training.tasks import Example, build_example, score

JPEG_QUALITY = 90


def sample_seed(seed: int, split: str, index: int) -> int:
    """The screen seed of the index-th example of split in a dataset built from seed."""
    digest = hashlib.sha256(f"{seed}:{split}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def write_example(example: Example, example_id: str, out_dir: Path, seed: int) -> dict:
    """Saves the example's image under out_dir/images and returns its JSONL record."""
    image_path = Path("images") / f"{example_id}.jpg"
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    example.image.save(out_dir / image_path, format="JPEG", quality=JPEG_QUALITY)
    return {
        "id": example_id,
        "image": image_path.as_posix(),
        "conversations": [
            {"from": "human", "value": f"<image>\n{example.prompt}"},
            {"from": "gpt", "value": example.answer},
        ],
        "adapter": example.kind,
        # Only a family's screens name one, so lines of today's mix keep their bytes.
        "metadata": {"task_type": example.kind, "target": example.target, "seed": seed,
                     **({"family": example.family} if example.family else {})},
    }


def write_examples(kind: str, split: str, count: int, seed: int, out_dir: Path, start: int = 0,
                   progress: bool = True, families: Sequence[str] = ()) -> list[dict]:
    """Generates count examples of kind for split, saves their images and returns their records.

    Ids are <kind>_<start+i:05d>; pass a different start per split that shares out_dir. With families, the
    i-th example is drawn in style family families[i % len(families)] (metadata.family names it); without,
    in today's mix of looks.
    """
    records = []
    for index in progress_bar(range(count), desc=f"{kind} {split}", unit="img", disable=not progress):
        example_seed = sample_seed(seed, split, index)
        example = build_example(kind, example_seed, families[index % len(families)] if families else None)
        records.append(write_example(example, f"{kind}_{start + index:05d}", out_dir, example_seed))
    return records


def write_dataset(kind: str, train: int, evaluation: int, seed: int, out_dir: Path, progress: bool = True) -> None:
    """out_dir/train.jsonl and out_dir/eval.jsonl (eval ids continuing after train's), with their images."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "train.jsonl", write_examples(kind, "train", train, seed, out_dir, progress=progress))
    write_jsonl(out_dir / "eval.jsonl", write_examples(kind, "eval", evaluation, seed, out_dir, start=train,
                                                       progress=progress))


def score_file(data_jsonl: Path, predictions: dict[str, str]) -> dict[str, float]:
    """Mean metrics of predictions (id -> model answer) over a dataset file.

    An id without a prediction is scored as an empty answer and counted in "missing"; "count" is the number
    of records.
    """
    records = read_jsonl(Path(data_jsonl))
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    missing = 0
    for record in records:
        if record["id"] not in predictions:
            missing += 1
        metadata = record["metadata"]
        metrics = score(metadata["task_type"], predictions.get(record["id"], ""), metadata["target"])
        for name, value in metrics.items():
            totals[name] += value
            counts[name] += 1
    means = {name: totals[name] / counts[name] for name in totals}
    return {"count": len(records), "missing": missing, **means}


@dataclass
class ExpertDatasetArguments:
    """The flags of `python -m training.expert_datasets`."""

    kind: str = field(metadata={"help": "Expert task to generate.", "choices": KINDS})
    output: Path = field(metadata={"help": "Output folder."})
    train: int = field(default=1000, metadata={"help": "Number of training examples."})
    eval: int = field(default=100, metadata={"help": "Number of evaluation examples."})
    seed: int = field(default=0, metadata={"help": "Dataset seed (per-sample seeds derive from it)."})

    def __post_init__(self) -> None:
        check_types(self)
        if self.kind not in KINDS:
            raise ConfigError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.train < 0 or self.eval < 0:
            raise ConfigError("--train and --eval must not be negative")


def write(args: ExpertDatasetArguments) -> int:
    """Write the dataset and say what was written."""
    write_dataset(args.kind, args.train, args.eval, args.seed, args.output)
    print(f"wrote {args.train} train and {args.eval} eval {args.kind} examples to {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    (args,) = parse_command(ExpertDatasetArguments, argv, prog="python -m training.expert_datasets",
                            description=__doc__)
    return run_command(lambda: write(args))


if __name__ == "__main__":
    raise SystemExit(main())
