"""A router validation's accuracy per style family: its predictions joined with the routing dataset's eval lines.

    python -m training.validate_router --adapter checkpoints/tiny/router \\
        --data datasets/ood/eval-classification.jsonl --out runs/ood
    python -m training.family_accuracy --predictions runs/ood/predictions.jsonl --dataset datasets/ood

predictions.jsonl is what training.validate_router (or benchmarks.validate_served) writes: id, gold, predicted,
correct per line. Each id's family is its line's metadata.family in the routing dataset's eval.jsonl (made with
`python -m training.generate_dataset --eval-families ...`); lines drawn in today's mix of looks count under
"(mix)". Prints one row per family, held-out families marked, then all lines together.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from lora_router.configuration import CommandError, ConfigError, check_types, parse_command, run_command
from lora_router.jsonl import read_jsonl
from training.screens import FAMILIES

MIX = "(mix)"
ALL = "all"
log = logging.getLogger(__name__)


def accuracy_by_family(predictions: list[dict], eval_lines: list[dict]) -> dict[str, dict]:
    """{family: {correct, count, accuracy, per_class: {gold: {correct, count}}}} over the predictions, families
    in first-seen order, then ALL; every prediction's id must be an eval line's."""
    family_of = {line["id"]: (line.get("metadata") or {}).get("family") or MIX for line in eval_lines}
    unknown = [p["id"] for p in predictions if p["id"] not in family_of]
    if unknown:
        raise CommandError(f"{len(unknown)} prediction id(s) are not in the eval lines, e.g. {unknown[0]!r}: "
                           f"predictions of another dataset?")
    tallies: dict[str, dict] = defaultdict(lambda: {"correct": 0, "count": 0, "per_class": defaultdict(
        lambda: {"correct": 0, "count": 0})})
    for prediction in predictions:
        for group in (family_of[prediction["id"]], ALL):
            for tally in (tallies[group], tallies[group]["per_class"][prediction["gold"]]):
                tally["count"] += 1
                tally["correct"] += bool(prediction["correct"])
    order = [name for name in tallies if name != ALL] + [ALL]
    return {name: {"correct": tallies[name]["correct"], "count": tallies[name]["count"],
                   "accuracy": round(tallies[name]["correct"] / tallies[name]["count"], 4),
                   "per_class": dict(tallies[name]["per_class"])} for name in order}


def format_table(report: dict[str, dict]) -> str:
    """One row per family (held-out ones marked) and the total: accuracy, correct/count, per-class recall."""
    classes = list(report[ALL]["per_class"])
    width = max(len("family"), *map(len, report)) + len(" (held out)")
    lines = [f"{'family':<{width}} {'accuracy':>8} {'correct':>9} " + " ".join(f"{c:>15}" for c in classes)]
    for name, row in report.items():
        label = f"{name} (held out)" if name in FAMILIES and FAMILIES[name].held_out else name
        cells = [f"{row['per_class'][c]['correct']}/{row['per_class'][c]['count']}" if c in row["per_class"]
                 else "-" for c in classes]
        lines.append(f"{label:<{width}} {row['accuracy']:>8.3f} {row['correct']:>4}/{row['count']:<4} "
                     + " ".join(f"{cell:>15}" for cell in cells))
    return "\n".join(lines)


@dataclass
class FamilyAccuracyArguments:
    """The flags of `python -m training.family_accuracy`."""

    predictions: Path = field(metadata={"help": "predictions.jsonl of a router validation."})
    dataset: Path = field(metadata={"help": "The routing dataset folder whose eval.jsonl was validated."})
    out: Path | None = field(default=None, metadata={"help": "Also write the numbers to this JSON file."})

    def __post_init__(self) -> None:
        check_types(self)
        missing = [str(path) for path in (self.predictions, self.dataset / "eval.jsonl") if not path.is_file()]
        if missing:
            raise ConfigError(f"not found: {', '.join(missing)}")


def run(args: FamilyAccuracyArguments) -> int:
    """Print the per-family table (and write it as JSON with --out)."""
    report = accuracy_by_family(read_jsonl(args.predictions), read_jsonl(args.dataset / "eval.jsonl"))
    print(format_table(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        log.info("wrote %s", args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    (args,) = parse_command(FamilyAccuracyArguments, argv, prog="python -m training.family_accuracy",
                            description=__doc__)
    return run_command(lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
