"""Turn a routing dataset into the router's classification training data.

    python -m training.convert_routing_to_classification datasets/routing_20260101_120000

Reads `train.jsonl` (required) and `eval.jsonl` (if present) of a routing dataset made by
`python -m training.generate_dataset`, and writes `train-classification.jsonl` and
`eval-classification.jsonl` next to them; the originals are never modified. Each output line asks the
router which adapter handles the screenshot and answers with the source line's `adapter`:

    {"id": ..., "image": ...,
     "conversations": [{"from": "system", "value": <router system prompt naming every label>},
                       {"from": "human", "value": "<image>\\n" + <router user prompt>},
                       {"from": "gpt", "value": <adapter>}],
     "metadata": {"task_type": "routing_classification", "original_task": ..., "label": <label index>}}

The labels (their order gives the label indices) come from, first found:
  1. `dataset.json`'s `classes` (written by the generator); `--classes` must then agree with it;
  2. `--classes a,b,c`;
  3. the sorted set of `adapter` values in `train.jsonl`.

`original_task` is the source line's `metadata.task_type`, or its adapter when that is absent.
The conversion stops at the first bad line (malformed JSON, missing `id`/`image`/`adapter`, an adapter that
is not a label, an image file that does not exist relative to the dataset folder) with FILE:LINE in the
message, and then writes nothing.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from lora_router.configuration import check_types, parse_command, run_command
from lora_router.jsonl import iter_jsonl
from lora_router.prompts import ROUTER_USER_PROMPT, router_system_prompt

SPLITS = ("train", "eval")
REQUIRED_FIELDS = ("id", "image", "adapter")
TASK_TYPE = "routing_classification"


class ConversionError(ValueError):
    """A routing dataset that cannot be converted; the message names the file and line where it can."""


def output_path(dataset_dir: Path, split: str) -> Path:
    """Where the classification lines of `split` are written: `<dataset_dir>/<split>-classification.jsonl`."""
    return dataset_dir / f"{split}-classification.jsonl"


def read_routing_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) for each non-blank line of a routing JSONL file, checking its fields."""
    for number, record in iter_jsonl(path, ConversionError):
        for name in REQUIRED_FIELDS:
            if not isinstance(record.get(name), str) or not record[name]:
                raise ConversionError(f"{path}:{number}: missing or non-string field {name!r}")
        yield number, record


def resolve_labels(dataset_dir: Path, classes: Sequence[str] | None = None) -> list[str]:
    """The router's labels, in label-index order: dataset.json's classes, else `classes`, else train's adapters."""
    meta_path = dataset_dir / "dataset.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConversionError(f"{meta_path}: malformed JSON ({e.msg})") from None
        recorded = meta.get("classes") if isinstance(meta, dict) else None
        if recorded:
            if classes and list(classes) != list(recorded):
                raise ConversionError(
                    f"--classes {','.join(classes)} differs from {meta_path}'s classes {','.join(recorded)}")
            return list(recorded)
    if classes:
        if len(set(classes)) != len(classes):
            raise ConversionError(f"duplicate class in {','.join(classes)}")
        return list(classes)
    labels = sorted({record["adapter"] for _, record in read_routing_lines(dataset_dir / "train.jsonl")})
    if not labels:
        raise ConversionError(f"{dataset_dir / 'train.jsonl'} is empty and no classes were given")
    return labels


def classification_line(record: dict, labels: Sequence[str]) -> dict:
    """The router's classification example for one routing record (whose adapter is one of `labels`)."""
    adapter = record["adapter"]
    metadata = record.get("metadata")
    return {
        "id": record["id"],
        "image": record["image"],
        "conversations": [
            {"from": "system", "value": router_system_prompt(labels)},
            {"from": "human", "value": f"<image>\n{ROUTER_USER_PROMPT}"},
            {"from": "gpt", "value": adapter},
        ],
        "metadata": {
            "task_type": TASK_TYPE,
            "original_task": metadata.get("task_type", adapter) if isinstance(metadata, dict) else adapter,
            "label": labels.index(adapter),
        },
    }


def _convert_split(dataset_dir: Path, split: str, labels: Sequence[str], out: TextIO) -> dict[str, int]:
    """Write one split's classification lines to the open file `out`; return its count per label."""
    path = dataset_dir / f"{split}.jsonl"
    counts = dict.fromkeys(labels, 0)
    for number, record in read_routing_lines(path):
        if record["adapter"] not in counts:
            raise ConversionError(
                f"{path}:{number}: unknown class {record['adapter']!r} (labels: {', '.join(labels)})")
        if not (dataset_dir / record["image"]).is_file():
            raise ConversionError(f"{path}:{number}: image file not found: {dataset_dir / record['image']}")
        out.write(json.dumps(classification_line(record, labels), ensure_ascii=False) + "\n")
        counts[record["adapter"]] += 1
    return counts


def convert_dataset(dataset_dir: Path | str, classes: Sequence[str] | None = None) -> dict[str, dict[str, int]]:
    """Write `<split>-classification.jsonl` for train (required) and eval (if present) of a routing dataset.

    Returns {split: {label: count}} for the splits converted. Raises ConversionError on the first bad line;
    nothing is written unless every split converts (files are written to temporaries, then renamed).
    """
    dataset_dir = Path(dataset_dir)
    if not (dataset_dir / "train.jsonl").is_file():
        raise ConversionError(f"{dataset_dir / 'train.jsonl'} not found")
    labels = resolve_labels(dataset_dir, classes)
    splits = [split for split in SPLITS if (dataset_dir / f"{split}.jsonl").is_file()]
    counts: dict[str, dict[str, int]] = {}
    temporaries: dict[str, Path] = {}
    try:
        for split in splits:
            fd, tmp = tempfile.mkstemp(dir=dataset_dir, prefix=f".{split}-classification.", suffix=".tmp")
            temporaries[split] = Path(tmp)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                counts[split] = _convert_split(dataset_dir, split, labels, out)
        for split, tmp in temporaries.items():
            tmp.replace(output_path(dataset_dir, split))
    finally:
        for tmp in temporaries.values():
            tmp.unlink(missing_ok=True)
    return counts


def format_count_table(counts: dict[str, dict[str, int]]) -> str:
    """A plain-text table of {split: {class: count}}: a row per class (first split's order) and a total row."""
    splits = list(counts)
    classes = list(counts[splits[0]])
    width = max([len("class"), len("total"), *map(len, classes)])
    header = f"{'class':<{width}}" + "".join(f" {split:>8}" for split in [*splits, "total"])
    rows = [header, "-" * len(header)]
    for name in [*classes, "total"]:
        cells = [sum(counts[s].values()) if name == "total" else counts[s].get(name, 0) for s in splits]
        rows.append(f"{name:<{width}}" + "".join(f" {cell:>8}" for cell in [*cells, sum(cells)]))
    return "\n".join(rows)


@dataclass
class ConvertArguments:
    """The arguments of `python -m training.convert_routing_to_classification`."""

    dataset_dir: Path = field(metadata={"help": "Routing dataset folder (with train.jsonl)."})
    classes: str | None = field(default=None, metadata={
        "help": "Comma-separated labels in label-index order, when the folder has no dataset.json."})

    def __post_init__(self) -> None:
        check_types(self)

    @property
    def class_list(self) -> list[str] | None:
        """The --classes list, or None to take the labels from the dataset."""
        return [name.strip() for name in self.classes.split(",") if name.strip()] if self.classes else None


def convert(args: ConvertArguments) -> int:
    """Convert the dataset; print the counts and the files written."""
    counts = convert_dataset(args.dataset_dir, args.class_list)
    print(format_count_table(counts))
    for split in counts:
        print(f"wrote {output_path(args.dataset_dir, split)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Convert the dataset named on the command line; exit status 1 (and the error) for a bad dataset."""
    (args,) = parse_command(ConvertArguments, argv, prog="python -m training.convert_routing_to_classification",
                            description=__doc__, positional=["dataset_dir"])
    return run_command(lambda: convert(args), runtime_errors=(ConversionError,))


if __name__ == "__main__":
    raise SystemExit(main())
