"""Two benchmark runs side by side: each target's value (a median over rounds where it has them) in both, and
whether they agree within a tolerance (the issue's "two runs back to back within 10%"). For a ratio measured over
rounds it also gives each run's range, and how many rounds per run its spread would take for two medians to agree
within the tolerance 19 times in 20 (when that exceeds the rounds run, a disagreement is the machine's noise).

    python -m benchmarks.compare benchmarks/results/<first> benchmarks/results/<second>

Writes compare.md beside the second run's report and exits 1 when a target measured in both runs differs by more
than the tolerance.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from lora_router.configuration import CommandError, check_types, parse_command, run_command

log = logging.getLogger(__name__)


@dataclass
class CompareArguments:
    """The flags of `python -m benchmarks.compare`."""

    first: Path = field(metadata={"help": "A benchmark run's folder (with report.json)."})
    second: Path = field(metadata={"help": "Another run's folder; compare.md is written there."})
    tolerance: float = field(default=0.10, metadata={
        "help": "Largest relative difference |second / first - 1| of a ratio taken as agreeing."})
    ms_tolerance: float = field(default=5.0, metadata={
        "help": "Largest difference of a target measured in ms (itself a difference, near 0) taken as agreeing."})

    def __post_init__(self) -> None:
        check_types(self)


@dataclass(frozen=True)
class Row:
    """One target in both runs."""

    name: str
    first: float | None
    second: float | None
    in_ms: bool  # a difference in ms (compared absolutely), else a ratio (compared relatively)
    first_rounds: tuple[float, ...] = ()
    second_rounds: tuple[float, ...] = ()

    @property
    def difference(self) -> float | None:
        """second - first in ms, or second / first - 1; None when either run did not measure it."""
        if self.first is None or self.second is None or (not self.in_ms and not self.first):
            return None
        return self.second - self.first if self.in_ms else self.second / self.first - 1

    def agrees(self, tolerance: float, ms_tolerance: float) -> bool | None:
        diff = self.difference
        return None if diff is None else abs(diff) <= (ms_tolerance if self.in_ms else tolerance)

    def rounds_needed(self, tolerance: float) -> int | None:
        """Rounds per run for two runs' medians to differ by at most `tolerance` 19 times in 20, from the spread of
        this ratio's log over the rounds of both runs (normal approximation: a median's standard error is 1.2533
        sigma / sqrt(n)); None for a target in ms or without two positive rounds in each run."""
        logs = [[math.log(v) for v in rounds if v > 0] for rounds in (self.first_rounds, self.second_rounds)]
        if self.in_ms or any(len(values) < 2 for values in logs):
            return None
        sigma = math.sqrt((statistics.variance(logs[0]) + statistics.variance(logs[1])) / 2)
        return max(1, math.ceil((1.96 * math.sqrt(2) * 1.2533 * sigma / math.log1p(tolerance)) ** 2))


def rows(first: dict, second: dict) -> list[Row]:
    """The targets of two report.json files, matched by name (a target's name carries no measured value)."""
    theirs = {t["name"]: t for t in second["targets"]}
    table = []
    for ours in first["targets"]:
        other = theirs.get(ours["name"], {})
        table.append(Row(ours["name"], ours["measured"], other.get("measured"), ours["threshold"].endswith(" ms"),
                         tuple(ours.get("rounds") or ()), tuple(other.get("rounds") or ())))
    return table


def markdown(table: list[Row], tolerance: float, ms_tolerance: float, first: Path, second: Path) -> str:
    lines = [f"# Two benchmark runs back to back\n\n`{first}` against `{second}`: a ratio agrees when "
             f"|second / first - 1| <= {tolerance:.0%}, a target in ms when they differ by at most "
             f"{ms_tolerance:g} ms. Rounds: each run's range over its rounds; rounds needed: per run, for two "
             f"medians within {tolerance:.0%} 19 times in 20 at this spread.\n",
             "| target | first | second | difference | agrees | first rounds | second rounds | rounds needed |",
             "|---|---|---|---|---|---|---|---|"]
    for row in table:
        diff, agrees = row.difference, row.agrees(tolerance, ms_tolerance)
        shown = "-" if diff is None else f"{diff:+.1f} ms" if row.in_ms else f"{diff:+.1%}"
        needed = row.rounds_needed(tolerance)
        lines.append(f"| {row.name} | {_f(row.first)} | {_f(row.second)} | {shown} | "
                     f"{ {None: '-', True: 'yes', False: '**no**'}[agrees]} | {_range(row.first_rounds)} | "
                     f"{_range(row.second_rounds)} | {'-' if needed is None else needed} |")
    return "\n".join(lines) + "\n"


def _range(rounds: tuple[float, ...]) -> str:
    return f"{len(rounds)}: {_f(min(rounds))}-{_f(max(rounds))}" if len(rounds) > 1 else "-"


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def compare(args: CompareArguments) -> int:
    reports = []
    for folder in (args.first, args.second):
        path = folder / "report.json"
        if not path.is_file():
            raise CommandError(f"{path}: no benchmark report there (run python -m benchmarks.load first)")
        reports.append(json.loads(path.read_text()))
    table = rows(*reports)
    out = args.second / "compare.md"
    out.write_text(markdown(table, args.tolerance, args.ms_tolerance, args.first, args.second))
    verdicts = [(r, r.agrees(args.tolerance, args.ms_tolerance)) for r in table]
    apart = [r for r, agrees in verdicts if agrees is False]
    for row in apart:
        log.warning("%s: %s vs %s (rounds needed at its spread: %s)", row.name, _f(row.first), _f(row.second),
                    row.rounds_needed(args.tolerance) or "-")
    log.info("%d of %d targets measured in both runs agree; table: %s", sum(a is True for _, a in verdicts),
             sum(a is not None for _, a in verdicts), out)
    return 1 if apart else 0


def main(argv: list[str] | None = None) -> int:
    (args,) = parse_command(CompareArguments, argv, prog="python -m benchmarks.compare", description=__doc__,
                            yaml_option=False, positional=["first", "second"])
    return run_command(lambda: compare(args))


if __name__ == "__main__":
    raise SystemExit(main())
