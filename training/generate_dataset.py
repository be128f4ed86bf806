"""Generate a routing dataset: screenshots of every class, each labelled with the expert adapter that handles it.

    python -m training.generate_dataset \\
      --train-images-calendar 27 --train-images-claim-window 3000 --train-images-provider-select 3000 \\
      --train-images-chandra-ocr 3000 --eval-images 7 --train-val-split 0.98 \\
      --calendar-dataset DIR --claim-window-dataset DIR --provider-select-dataset DIR --chandra-ocr-dataset DIR

Classes are data: every `--train-images-<class> N` flag adds <class> (after those of `--classes a,b,c`, or
else of the YAML `--config`'s `classes:`). With neither, the classes are calendar, claim-window and
provider-select. The class order gives the label indices. Precedence: defaults < `--config` YAML (keys named
like the flags: `classes: [..]`, `train_images: {class: N}`, `datasets: {class: DIR}`, `eval_images: E`, ...)
< flags.

Samples of a class come from `--<class>-dataset DIR` when given: a folder with the user's expert dataset
(LLaVA JSONL: every `*.jsonl` in it, each line with an `image` path relative to the folder), sampled without
replacement, deterministically by seed, with the images copied (metadata.source names the original).
Otherwise the class's synthetic screen generator makes them, with per-sample seeds from the splits
"routing-train" and "routing-eval" (training.expert_datasets.sample_seed). A class with neither is an error.

Style families (training.screens.styles): `--eval-families mobile,dense` draws the synthetic eval-only samples
in those families, in turn (sample i of a class in family i mod count), e.g. to measure a router on looks it
never saw; `--train-families` does the same for the training samples (and so for the N - floor(N*F) of them
that go to eval.jsonl), and refuses held-out families, which must never be used to train. Without them,
screens are drawn in today's mix of looks. A line drawn in a family names it in metadata.family.

Counts, per class, with N = --train-images-<class> (default 100), E = --eval-images,
F = --train-val-split (0 < F <= 1):
  * N + E samples are made, with ids <class>_00000 .. <class>_<N+E-1>; the E eval-only samples come from
    seeds (or dataset lines) disjoint from those of the N training samples;
  * train.jsonl keeps floor(N * F) of the N training samples;
  * eval.jsonl holds the other N - floor(N * F) training samples plus the E eval-only samples.
  E.g. N=27, E=7, F=0.98: 26 train lines and 1 + 7 = 8 eval lines.

Output folder (--output DIR, else <--output-root>/routing_<YYYYMMDD_HHMMSS>): train.jsonl (shuffled by
seed), eval.jsonl, images/, and dataset.json (classes in label order, counts per class and split, seed and
the resolved arguments). A line is the expert sample plus "adapter": <class>, "label": <class index> and
"metadata": {"task_type": <class>, ...}. The folder appears only once complete.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import random
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from lora_router.configuration import ArgumentParser, ConfigError, check_types, run_command
from lora_router.jsonl import iter_jsonl, write_jsonl
from lora_router.progress import progress
from training.convert_routing_to_classification import format_count_table
from training.expert_datasets import write_examples
from training.screens import FAMILIES, HELD_OUT, IN_DISTRIBUTION, KINDS

DEFAULT_CLASSES = ("calendar", "claim-window", "provider-select")
DEFAULT_TRAIN_IMAGES = 100
CLASS_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")
TRAIN_FLAG = "--train-images-"
DATASET_FLAG_SUFFIX = "-dataset"


class DatasetError(ValueError):
    """A user's expert dataset that cannot be sampled; the message names the file (and line) at fault."""


@dataclass
class RoutingDatasetConfig:
    """What to generate. Checked on creation; `train_images` is filled in for every class."""

    classes: tuple[str, ...] = field(default=DEFAULT_CLASSES, metadata={
        "help": "Class names in label-index order (lowercase letters, digits, '-', '_', '.'), comma- or "
                "space-separated."})
    train_images: dict[str, int] = field(default_factory=dict, metadata={
        "help": f"Training samples per class (class=N,...; or {TRAIN_FLAG}<class> N), before the train/val "
                f"split; missing classes get {DEFAULT_TRAIN_IMAGES}."})
    datasets: dict[str, Path] = field(default_factory=dict, metadata={
        "help": f"Per class, a folder with the user's expert dataset (*.jsonl, image paths relative to it) to "
                f"sample from instead of the synthetic generator (class=DIR,...; or --<class>{DATASET_FLAG_SUFFIX} "
                f"DIR)."})
    eval_images: int = field(default=10, metadata={
        "help": "Eval-only samples per class, from seeds/lines disjoint from the training samples."})
    train_val_split: float = field(default=0.98, metadata={
        "help": "Fraction F in (0, 1] of each class's N training samples kept in train.jsonl (floor(N*F)); "
                "the rest go to eval.jsonl."})
    train_families: tuple[str, ...] = field(default=(), metadata={
        "help": f"In-distribution style families ({', '.join(IN_DISTRIBUTION)}) to draw synthetic training "
                f"samples in, in turn, comma- or space-separated; empty: today's mix. Held-out families are "
                f"refused: they must never be used to train."})
    eval_families: tuple[str, ...] = field(default=(), metadata={
        "help": f"Style families to draw synthetic eval-only samples in, in turn, comma- or space-separated: "
                f"in-distribution {', '.join(IN_DISTRIBUTION)} or held out {', '.join(HELD_OUT)}; empty: "
                f"today's mix."})
    seed: int = field(default=0, metadata={"help": "Seed of every random choice; same seed, same lines."})
    output_root: Path = field(default=Path("datasets"), metadata={
        "help": "Parent of the default output folder routing_<YYYYMMDD_HHMMSS>."})
    output: Path | None = field(default=None, metadata={
        "help": "Exact output folder (must not exist or be empty); overrides output_root."})

    def __post_init__(self) -> None:
        check_types(self)
        self.classes = tuple(name.strip() for entry in self.classes for name in entry.split(",") if name.strip())
        if not self.classes:
            raise ConfigError("the class list is empty: give at least one class")
        for name in self.classes:
            if not CLASS_NAME.fullmatch(name):
                raise ConfigError(f"bad class name {name!r}: use lowercase letters, digits, '-', '_' or '.'")
            if self.classes.count(name) > 1:
                raise ConfigError(f"duplicate class {name!r} in {', '.join(self.classes)}")
        for what, mapping in (("train_images", self.train_images), ("datasets", self.datasets)):
            for name in mapping:
                if name not in self.classes:
                    raise ConfigError(f"{what} names {name!r}, which is not a class ({', '.join(self.classes)})")
        self.train_images = {name: self.train_images.get(name, DEFAULT_TRAIN_IMAGES) for name in self.classes}
        for name, count in self.train_images.items():
            if count < 0:
                raise ConfigError(f"train images of {name!r} must be a whole number >= 0, got {count!r}")
        if self.eval_images < 0:
            raise ConfigError(f"eval images must be a whole number >= 0, got {self.eval_images!r}")
        if not 0 < self.train_val_split <= 1:
            raise ConfigError(f"train/val split must be in (0, 1], got {self.train_val_split}")
        for name, folder in self.datasets.items():
            if not folder.is_dir():
                raise ConfigError(f"dataset folder of {name!r} not found: {folder}")
        for name in self.classes:
            if name not in KINDS and name not in self.datasets:
                raise ConfigError(f"class {name!r} has no synthetic generator (generators: {', '.join(KINDS)}) "
                                  f"and no dataset folder (--{name}{DATASET_FLAG_SUFFIX} DIR)")
        self._check_families()

    def _check_families(self) -> None:
        """Split the family lists on commas; raise one ConfigError naming every family at fault."""
        self.train_families, self.eval_families = (
            tuple(name.strip() for entry in families for name in entry.split(",") if name.strip())
            for families in (self.train_families, self.eval_families))
        problems = [f"unknown style family {name!r} in {what}" for what in ("train_families", "eval_families")
                    for name in getattr(self, what) if name not in FAMILIES]
        problems += [f"held-out style family {name!r} must never be used to train; give it in eval_families"
                     for name in self.train_families if name in HELD_OUT]
        # A family dresses the generator's screens only; a user's screenshots would be counted under it unchanged.
        if (self.train_families or self.eval_families) and self.datasets:
            problems.append(f"style families apply to synthetic screens only, but {', '.join(self.datasets)} "
                            f"sample(s) from a dataset folder")
        if problems:
            raise ConfigError(f"{'; '.join(problems)} (families: in-distribution {', '.join(IN_DISTRIBUTION)}; "
                              f"held out {', '.join(HELD_OUT)})")

    def kept_in_train(self, name: str) -> int:
        """floor(N * F): how many of the class's N training samples stay in train.jsonl."""
        # Rounded first so that e.g. 100 * 0.29 counts as 29, not 28.999...
        return math.floor(round(self.train_images[name] * self.train_val_split, 9))


def sample_id(name: str, number: int) -> str:
    """The id of a class's sample `number` (0-based, as write_examples numbers them), e.g. claim-window_00447."""
    return f"{name}_{number:05d}"


def synthetic_samples(name: str, train_count: int, eval_count: int, seed: int, out_dir: Path,
                      train_families: Sequence[str] = (), eval_families: Sequence[str] = ()) -> list[dict]:
    """The class's training samples, then its eval-only ones, from its screen generator, each set drawn in its
    style families in turn (none: today's mix).

    Their own split names give both seed sets apart from each other and from expert datasets of the same seed.
    """
    return (write_examples(name, "routing-train", train_count, seed, out_dir, families=train_families)
            + write_examples(name, "routing-eval", eval_count, seed, out_dir, start=train_count,
                             families=eval_families))


def read_user_dataset(folder: Path) -> list[dict]:
    """Every line of the `*.jsonl` files of a user's expert dataset (sorted by file name), images checked."""
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise DatasetError(f"no *.jsonl file in dataset folder {folder}")
    samples = []
    for path in files:
        for number, sample in iter_jsonl(path, DatasetError):
            if not isinstance(sample.get("image"), str):
                raise DatasetError(f"{path}:{number}: expected an object with a string 'image' field")
            if not (folder / sample["image"]).is_file():
                raise DatasetError(f"{path}:{number}: image file not found: {folder / sample['image']}")
            samples.append(sample)
    return samples


def user_samples(name: str, folder: Path, count: int, seed: int, out_dir: Path) -> list[dict]:
    """`count` samples drawn without replacement from a user's dataset, images copied into out_dir/images."""
    pool = read_user_dataset(folder)
    if len(pool) < count:
        raise DatasetError(f"dataset folder of {name!r} ({folder}) has {len(pool)} samples, {count} needed "
                           f"(train images + eval images)")
    chosen = random.Random(f"{seed}:{name}").sample(pool, count)
    lines = []
    for number, sample in enumerate(progress(chosen, desc=f"{name} from {folder}", unit="img")):
        source = folder / sample["image"]
        image = f"images/{sample_id(name, number)}{source.suffix.lower()}"
        shutil.copyfile(source, out_dir / image)
        lines.append({**sample, "id": sample_id(name, number), "image": image,
                      "metadata": {**(sample.get("metadata") or {}), "source": str(source)}})
    return lines


def routing_line(sample: dict, name: str, label: int) -> dict:
    """An expert sample labelled for routing: its `adapter`, `label` and `metadata.task_type` set to the class."""
    return {**sample, "adapter": name, "label": label,
            "metadata": {**(sample.get("metadata") or {}), "task_type": name}}


def generate_routing_dataset(cfg: RoutingDatasetConfig) -> Path:
    """Write the routing dataset `cfg` describes (see the module docstring) and return its folder.

    Everything is written to a temporary sibling folder, renamed into place only when complete.
    """
    out = cfg.output or cfg.output_root / f"routing_{datetime.now():%Y%m%d_%H%M%S}"
    with folder_written_whole(out) as work:
        (work / "images").mkdir()
        train, evaluation = [], []
        counts: dict[str, dict[str, int]] = {"train": {}, "eval": {}}
        for label, name in enumerate(cfg.classes):
            count = cfg.train_images[name] + cfg.eval_images
            if name in cfg.datasets:
                samples = user_samples(name, cfg.datasets[name], count, cfg.seed, work)
            else:
                samples = synthetic_samples(name, cfg.train_images[name], cfg.eval_images, cfg.seed, work,
                                            cfg.train_families, cfg.eval_families)
            kept = cfg.kept_in_train(name)
            lines = [routing_line(sample, name, label) for sample in samples]
            train += lines[:kept]
            evaluation += lines[kept:]
            counts["train"][name] = kept
            counts["eval"][name] = count - kept
        random.Random(cfg.seed).shuffle(train)
        write_jsonl(work / "train.jsonl", train)
        write_jsonl(work / "eval.jsonl", evaluation)
        arguments = {**asdict(cfg), "datasets": {k: str(v) for k, v in cfg.datasets.items()},
                     "output_root": str(cfg.output_root), "output": str(out)}
        meta = {"classes": list(cfg.classes), "counts": counts, "seed": cfg.seed, "arguments": arguments}
        (work / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


@contextlib.contextmanager
def folder_written_whole(out: Path) -> Iterator[Path]:
    """A temporary sibling of `out` to write a dataset into, renamed to `out` once the block ends without error
    (removed if it fails): `out` appears complete or not at all. `out` must not exist, or be an empty folder."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output folder {out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield work
        if out.exists():
            out.rmdir()
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def classes_in_argv(argv: list[str]) -> list[str]:
    """Class names of the per-class flags in argv (`--train-images-<c>`, `--<c>-dataset`), first seen first."""
    names: list[str] = []
    for token in argv:
        flag = token.split("=", 1)[0]
        if flag.startswith(TRAIN_FLAG):
            name = flag[len(TRAIN_FLAG):]
        elif flag.startswith("--") and flag.endswith(DATASET_FLAG_SUFFIX):
            name = flag[2:-len(DATASET_FLAG_SUFFIX)]
        else:
            continue
        if name and name not in names:
            names.append(name)
    return names


def build_parser(classes: list[str] | tuple[str, ...] = ()) -> ArgumentParser:
    """The command-line parser: RoutingDatasetConfig's fields, plus per-class flags for the generator kinds and
    for `classes`."""
    parser = ArgumentParser([RoutingDatasetConfig], prog="python -m training.generate_dataset", description=__doc__)
    per_class = parser.add_argument_group(
        "per class", f"{TRAIN_FLAG}<class> N and --<class>{DATASET_FLAG_SUFFIX} DIR work for any class name; "
                     f"the first adds the class")
    for name in dict.fromkeys([*KINDS, *classes]):
        per_class.add_argument(f"{TRAIN_FLAG}{name}", type=int, default=None, metavar="N",
                               dest=f"train_images:{name}", help=f"training samples of {name} (default: "
                                                                 f"{DEFAULT_TRAIN_IMAGES})")
        per_class.add_argument(f"--{name}{DATASET_FLAG_SUFFIX}", type=Path, default=None, metavar="DIR",
                               dest=f"dataset:{name}", help=f"expert dataset folder to sample {name} from")
    return parser


def with_class_flags(cfg: RoutingDatasetConfig, flags: argparse.Namespace) -> RoutingDatasetConfig:
    """`cfg` with the per-class flags applied: each `--train-images-<c> N` sets (and adds) class c, each
    `--<c>-dataset DIR` sets the folder of a class."""
    given = vars(flags)
    train_flags = {key.split(":", 1)[1]: value for key, value in given.items()
                   if key.startswith("train_images:") and value is not None}
    dataset_flags = {key.split(":", 1)[1]: value for key, value in given.items()
                     if key.startswith("dataset:") and value is not None}
    classes = [*cfg.classes, *(name for name in train_flags if name not in cfg.classes)]
    for name in dataset_flags:
        if name not in classes:
            raise ConfigError(f"--{name}{DATASET_FLAG_SUFFIX} is given but {name!r} is not a class "
                              f"({', '.join(classes)}); add {TRAIN_FLAG}{name} N")
    return dataclasses.replace(cfg, classes=tuple(classes), train_images={**cfg.train_images, **train_flags},
                               datasets={**cfg.datasets, **dataset_flags})


def parse_config(argv: list[str]) -> RoutingDatasetConfig:
    """The config a command line describes; exits with a usage error (status 2) on a bad flag or setting."""
    parser = build_parser(classes_in_argv(argv))
    cfg, flags = parser.parse(argv)
    try:
        return with_class_flags(cfg, flags)
    except ValueError as e:
        parser.error(str(e))


def generate(cfg: RoutingDatasetConfig) -> int:
    """Generate the dataset; print a count table and the folder."""
    out = generate_routing_dataset(cfg)
    print(format_count_table(json.loads((out / "dataset.json").read_text(encoding="utf-8"))["counts"]))
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Generate the routing dataset the command line describes."""
    cfg = parse_config(sys.argv[1:] if argv is None else list(argv))
    return run_command(lambda: generate(cfg), runtime_errors=(DatasetError, FileExistsError))


if __name__ == "__main__":
    raise SystemExit(main())
