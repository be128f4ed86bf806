"""Route and run a whole folder or JSONL list of screenshots, writing one JSON line per item.

    python -m router_client.batch --config configs/tiny-cpu.yaml --input screens/ --output results.jsonl

Input: a folder of images (.png .jpg .jpeg .webp, searched recursively, sorted; custom_id = the path relative
to the folder), or a JSONL file of {"custom_id"?, "image", "prompt"?} lines (image paths relative to the JSONL
file; custom_id defaults to the image path as written). Without a prompt, the routed expert's default prompt
from the config is used.

Output: one line per item, appended and flushed as items finish:
    {"custom_id", "status": "ok", "expert", "confidence", "fallback_reason", "answer", "tool_call", "timings"}
    {"custom_id", "status": "error", "error": {"type", "message"}}

Resuming: a rerun with the same output skips the ids that already have an "ok" line, cuts off a torn last line
(a crash mid-write), and redoes everything else. An id that failed before gets a new line on the rerun, so a
file may hold several lines for one id: the last one is its current state, and at most one is "ok". The exit
status is 1 when any item of this run failed (rerun to retry them), 2 for bad arguments or input.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from router_client._constants import DEFAULT_BATCH_CONCURRENCY, IMAGE_SUFFIXES
from router_client.cli import ClientArguments
from router_client.client import RouterClient
from router_client.config import ClientConfig
from router_client.errors import APIConnectionError, APITimeoutError, RouterClientError
from router_client.percentiles import Percentiles, percentiles
from router_client.types import ProcessResult
from training.configuration import ConfigError, check_types, parse_command, run_command
from training.jsonl import append_jsonl, cut_torn_line, iter_jsonl
from training.progress import progress as progress_bar

log = logging.getLogger(__name__)

_JSONL_KEYS = {"custom_id", "image", "prompt"}


class BatchInputError(ConfigError):
    """An input or output file the batch cannot use; the message names the file (and line)."""


@dataclass(frozen=True)
class BatchItem:
    """One screenshot to process: its id in the output, its file, and an optional task prompt."""

    custom_id: str
    image: Path
    prompt: str | None = None


@dataclass
class BatchSummary:
    """What one run_batch call did. `skipped` items were already "ok" in the output before it started."""

    total: int
    skipped: int = 0
    ok: int = 0
    failed: int = 0
    by_expert: Counter[str] = field(default_factory=Counter)
    by_error: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def latency(self) -> Percentiles:
        """Percentiles of the per-item latencies of this run's ok items."""
        return percentiles(self.latencies_s)

    def table(self) -> str:
        """The summary as a small text table: outcomes, experts, errors and latency percentiles."""
        rows = [("items", str(self.total)), ("skipped (done before)", str(self.skipped)), ("ok", str(self.ok)),
                ("failed", str(self.failed))]
        rows += [(f"  expert {name}", str(n)) for name, n in sorted(self.by_expert.items())]
        rows += [(f"  error {name}", str(n)) for name, n in sorted(self.by_error.items())]
        latency = self.latency
        for name, value in (("p50", latency.p50), ("p90", latency.p90), ("p99", latency.p99)):
            rows.append((f"latency {name}", "-" if value is None else f"{value:.3f} s"))
        rows.append(("wall time", f"{self.wall_s:.1f} s"))
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value:>10}" for name, value in rows)


def load_items(path: str | Path) -> list[BatchItem]:
    """The items of a folder of images or of a JSONL file; raises BatchInputError for unusable input."""
    path = Path(path)
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        items = sorted((BatchItem(p.relative_to(path).as_posix(), p) for p in files), key=lambda i: i.custom_id)
    elif path.is_file():
        items = _read_jsonl_items(path)
    else:
        raise BatchInputError(f"{path}: no such file or folder")
    if not items:
        raise BatchInputError(f"{path}: no items (images: {', '.join(IMAGE_SUFFIXES)})")
    counts = Counter(item.custom_id for item in items)
    repeated = sorted(custom_id for custom_id, n in counts.items() if n > 1)
    if repeated:
        raise BatchInputError(f"{path}: custom_id repeated: {', '.join(repeated[:5])}")
    return items


def _read_jsonl_items(path: Path) -> list[BatchItem]:
    items = []
    for number, entry in iter_jsonl(path, BatchInputError):
        where = f"{path}:{number}"
        if not isinstance(entry.get("image"), str):
            raise BatchInputError(f'{where}: expected an object with an "image" path')
        unknown = sorted(set(entry) - _JSONL_KEYS)
        if unknown:
            known = ", ".join(sorted(_JSONL_KEYS))
            raise BatchInputError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {known})")
        custom_id, prompt = entry.get("custom_id", entry["image"]), entry.get("prompt")
        if not isinstance(custom_id, str) or not (prompt is None or isinstance(prompt, str)):
            raise BatchInputError(f"{where}: custom_id and prompt must be strings")
        items.append(BatchItem(custom_id, path.parent / entry["image"], prompt))
    return items


def read_output(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """The result lines of an output file by custom_id, in file order; a torn last line is cut off the file.

    Raises BatchInputError for a complete line that is no result line (the file is not ours to repair).
    """
    path = Path(path)
    if not path.exists():
        return {}
    cut_torn_line(path)
    lines: dict[str, list[dict[str, Any]]] = {}
    for number, record in iter_jsonl(path, BatchInputError):
        if not isinstance(record.get("custom_id"), str):
            raise BatchInputError(f"{path}:{number}: not a result line (no custom_id): {str(record)[:120]}")
        lines.setdefault(record["custom_id"], []).append(record)
    return lines


async def run_batch(cfg: ClientConfig, items: Sequence[BatchItem], output: str | Path,
                    concurrency: int = DEFAULT_BATCH_CONCURRENCY, *, progress: bool = True) -> BatchSummary:
    """Process the items not yet "ok" in `output`, `concurrency` at a time, appending one line per item.

    Per-item failures (bad image, API errors after retries, routing errors) become error lines; the batch
    goes on. An error reaching the server at start-up (router mode resolution) is raised.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = {cid for cid, records in read_output(output).items() if any(r.get("status") == "ok" for r in records)}
    pending = [item for item in items if item.custom_id not in done]
    summary = BatchSummary(total=len(items), skipped=len(items) - len(pending))
    start = time.perf_counter()
    async with RouterClient(cfg) as client:
        with append_jsonl(output) as append, \
                progress_bar(total=len(pending), desc="batch", unit="img", disable=not progress) as bar:
            todo = iter(pending)

            async def worker() -> None:
                # One shared iterator: each item is taken by exactly one worker.
                for item in todo:
                    record = await _process_item(client, item)
                    append(record)
                    _count(summary, record)
                    bar.set_postfix({**summary.by_expert, "failed": summary.failed}, refresh=False)
                    bar.update()

            await asyncio.gather(*(worker() for _ in range(min(concurrency, len(pending)))))
    summary.wall_s = time.perf_counter() - start
    return summary


async def _process_item(client: RouterClient, item: BatchItem) -> dict[str, Any]:
    try:
        result = await client.process(item.image, item.prompt)
    except RouterClientError as exc:
        return {"custom_id": item.custom_id, "status": "error",
                "error": {"type": type(exc).__name__, "message": str(exc)}}
    return _ok_record(item.custom_id, result)


def _ok_record(custom_id: str, result: ProcessResult) -> dict[str, Any]:
    call = result.result.tool_call
    return {"custom_id": custom_id, "status": "ok", "expert": result.decision.expert,
            "confidence": result.decision.confidence, "fallback_reason": result.decision.fallback_reason,
            "answer": result.result.text, "tool_call": None if call is None else asdict(call),
            "timings": asdict(result.timings)}


def _count(summary: BatchSummary, record: dict[str, Any]) -> None:
    if record["status"] == "ok":
        summary.ok += 1
        summary.by_expert[record["expert"]] += 1
        summary.latencies_s.append(record["timings"]["total_s"])
    else:
        summary.failed += 1
        summary.by_error[record["error"]["type"]] += 1


@dataclass
class BatchArguments(ClientArguments):
    """The flags of `python -m router_client.batch`."""

    input: Path = field(kw_only=True, metadata={
        "help": "Folder of images, or JSONL of {custom_id?, image, prompt?}."})
    output: Path = field(kw_only=True, metadata={"help": "Result JSONL (appended; a rerun resumes it)."})
    concurrency: int = field(default=DEFAULT_BATCH_CONCURRENCY, metadata={"help": "Items in flight."})
    progress: bool = field(default=True, metadata={
        "help": "Show progress: a bar on a terminal, else a log line every few seconds (--no-progress: none)."})

    def __post_init__(self) -> None:
        check_types(self)
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {self.concurrency}")


def run(args: BatchArguments) -> int:
    """Check the settings and the input, run the batch, print its summary; 1 if any item failed."""
    cfg = args.client_config(args.deployment())
    items = load_items(args.input)
    try:
        summary = asyncio.run(run_batch(cfg, items, args.output, args.concurrency, progress=args.progress))
    except APITimeoutError:
        raise  # a server that is there but slow: its own message says which timeout
    except APIConnectionError as exc:
        raise args.unreachable(exc, cfg.base_url) from None
    if not summary.ok and set(summary.by_error) == {"APIConnectionError"}:
        log.error("no item reached the server at %s. %s", cfg.base_url, args.start_server_hint())
    print(summary.table())
    return 1 if summary.failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """The batch command line; returns the exit status."""
    (args,) = parse_command(BatchArguments, argv, prog="python -m router_client.batch", description=__doc__,
                            yaml_option=False)
    return run_command(lambda: run(args), runtime_errors=(RouterClientError,))


if __name__ == "__main__":
    raise SystemExit(main())
