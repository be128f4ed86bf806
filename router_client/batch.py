"""Route and run a whole folder or JSONL list of screenshots, or run an OpenAI Batch file, writing one JSON line
per item.

    python -m router_client.batch --config configs/tiny-cpu.yaml --input screens/ --output results.jsonl
    python -m router_client.batch --config configs/tiny-cpu.yaml --input requests.jsonl --output results.jsonl

Two formats; a JSONL input's first line tells which (one with method, url or body is OpenAI's), and the output
is in the input's format.

Native input: a folder of images (.png .jpg .jpeg .webp, searched recursively, sorted; custom_id = the path
relative to the folder), or a JSONL file of {"custom_id"?, "image", "prompt"?} lines (image paths relative to
the JSONL file; custom_id defaults to the image path as written). Without a prompt, the routed expert's default
prompt is used. The client routes each screenshot (a router request, then the expert's); with --via-gateway the
routing gateway (`python -m serving`) does, one `model: "auto"` request per screenshot. Native output, one line
per item either way:
    {"custom_id", "status": "ok", "expert", "confidence", "fallback_reason", "answer", "tool_call", "timings"}
    {"custom_id", "status": "error", "error": {"type", "message"}}

OpenAI Batch input: lines {"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {chat request}}.
Each body is sent as it is: model "auto" is routed by the gateway, any other model name answers itself. An
image_url.url that is a local file path (relative to the JSONL file) is sent as a data URL; data: and http(s)
URLs go as they are. --via-gateway does not apply. OpenAI Batch output, one line per request:
    {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}
    {"id", "custom_id", "response": {...} or null, "error": {"code", "message"}}   (failed; code: the error class)

Resuming: a rerun with the same output skips the ids that already have an "ok" line (OpenAI: status_code 200),
cuts off a torn last line (a crash mid-write), and redoes everything else. An id that failed before gets a new
line on the rerun, so a file may hold several lines for one id: the last one is its current state, and at most
one is done. The exit status is 1 when any item of this run failed (rerun to retry them), 2 for bad arguments
or input.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from lora_router.configuration import ConfigError, check_types, parse_command, run_command
from lora_router.jsonl import append_jsonl, cut_torn_line, iter_jsonl
from lora_router.percentiles import Percentiles, percentiles
from lora_router.progress import progress as progress_bar
from router_client._constants import DEFAULT_BATCH_CONCURRENCY, IMAGE_SUFFIXES
from router_client.cli import ClientArguments
from router_client.client import RouterClient, prepare_image
from router_client.config import ClientConfig
from router_client.errors import APIConnectionError, APIStatusError, APITimeoutError, RouterClientError
from router_client.types import ProcessResult

log = logging.getLogger(__name__)

BatchFormat = Literal["native", "openai"]
_JSONL_KEYS = {"custom_id", "image", "prompt"}
_OPENAI_KEYS = {"custom_id", "method", "url", "body"}
_OPENAI_URL = "/v1/chat/completions"
# Image URLs an OpenAI-format body sends as they are; anything else is a local file path.
_URL_PREFIXES = ("data:", "http://", "https://")


class BatchInputError(ConfigError):
    """An input or output file the batch cannot use; the message names the file (and line)."""


@dataclass(frozen=True)
class BatchItem:
    """One screenshot to process: its id in the output, its file, and an optional task prompt."""

    custom_id: str
    image: Path
    prompt: str | None = None


@dataclass(frozen=True)
class LocalImage:
    """An image_url part of an OpenAI-format body that names a local file: where it is and the file."""

    message: int
    part: int
    path: Path


@dataclass(frozen=True)
class OpenAIBatchItem:
    """One request of an OpenAI Batch file: its id, its chat-completions body, and the body's local images."""

    custom_id: str
    body: dict[str, Any]
    local_images: tuple[LocalImage, ...] = ()


Item = BatchItem | OpenAIBatchItem


@dataclass(frozen=True)
class ItemOutcome:
    """A finished item: its output line, and who answered it (ok) or the error's class name (failed)."""

    line: dict[str, Any]
    expert: str | None = None
    error: str | None = None


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


def load_items(path: str | Path) -> list[Item]:
    """The items of a folder of images or of a JSONL file (native or OpenAI Batch lines, told by the first line);
    raises BatchInputError naming FILE:LINE for unusable input."""
    path = Path(path)
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        items: list[Item] = sorted((BatchItem(p.relative_to(path).as_posix(), p) for p in files),
                                   key=lambda i: i.custom_id)
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


def batch_format(items: Sequence[Item]) -> BatchFormat:
    """The format of a batch's items: 'openai' for OpenAI Batch requests, else 'native'; ValueError for a mix."""
    kinds = {type(item) for item in items}
    if len(kinds) > 1:
        raise ValueError("a batch holds one format: these items mix native and OpenAI Batch items")
    return "openai" if kinds == {OpenAIBatchItem} else "native"


def _read_jsonl_items(path: Path) -> list[Item]:
    items: list[Item] = []
    for number, entry in iter_jsonl(path, BatchInputError):
        where = f"{path}:{number}"
        openai = bool({"method", "url", "body"} & set(entry))
        if items and openai != isinstance(items[0], OpenAIBatchItem):
            this, first = ("an OpenAI Batch", "native") if openai else ("a native", "OpenAI Batch")
            raise BatchInputError(f"{where}: {this} line in a file of {first} lines (as its first line says); "
                                  "one file holds one format")
        items.append(_openai_item(entry, where, path.parent) if openai else _native_item(entry, where, path.parent))
    return items


def _native_item(entry: dict[str, Any], where: str, folder: Path) -> BatchItem:
    if not isinstance(entry.get("image"), str):
        raise BatchInputError(f'{where}: expected an object with an "image" path')
    unknown = sorted(set(entry) - _JSONL_KEYS)
    if unknown:
        known = ", ".join(sorted(_JSONL_KEYS))
        raise BatchInputError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {known})")
    custom_id, prompt = entry.get("custom_id", entry["image"]), entry.get("prompt")
    if not isinstance(custom_id, str) or not (prompt is None or isinstance(prompt, str)):
        raise BatchInputError(f"{where}: custom_id and prompt must be strings")
    return BatchItem(custom_id, folder / entry["image"], prompt)


def _openai_item(entry: dict[str, Any], where: str, folder: Path) -> OpenAIBatchItem:
    unknown = sorted(set(entry) - _OPENAI_KEYS)
    if unknown:
        raise BatchInputError(f"{where}: unknown key(s) {', '.join(unknown)} in an OpenAI Batch line "
                              f"(known: {', '.join(sorted(_OPENAI_KEYS))})")
    if not isinstance(entry.get("custom_id"), str):
        raise BatchInputError(f"{where}: custom_id must be a string")
    if entry.get("method") != "POST" or entry.get("url") != _OPENAI_URL:
        raise BatchInputError(f'{where}: only "method": "POST" with "url": "{_OPENAI_URL}" is supported, got '
                              f"{entry.get('method')!r} {entry.get('url')!r}")
    body = entry.get("body")
    is_chat = isinstance(body, dict) and isinstance(body.get("model"), str) and isinstance(body.get("messages"), list)
    if not is_chat:
        raise BatchInputError(f'{where}: body must be a chat request with a "model" string and a "messages" list')
    if body.get("stream"):
        raise BatchInputError(f"{where}: stream is not supported in a batch (one JSON answer per line)")
    local = [LocalImage(m, p, folder / url) for m, p, url in _image_urls(body) if not url.startswith(_URL_PREFIXES)]
    return OpenAIBatchItem(entry["custom_id"], body, tuple(local))


def _image_urls(body: dict[str, Any]) -> Iterator[tuple[int, int, str]]:
    """(message index, part index, url) of each image_url part of a chat request's messages."""
    for m, message in enumerate(body["messages"]):
        content = message.get("content") if isinstance(message, dict) else None
        for p, part in enumerate(content if isinstance(content, list) else []):
            image_url = part.get("image_url") if isinstance(part, dict) else None
            if isinstance(image_url, dict) and isinstance(image_url.get("url"), str):
                yield m, p, image_url["url"]


def read_output(path: str | Path, fmt: BatchFormat = "native") -> dict[str, list[dict[str, Any]]]:
    """The result lines of an output file by custom_id, in file order; a torn last line is cut off the file.

    Raises BatchInputError for a complete line that is no result line of format `fmt` (the file is not ours to
    repair, and a file of the other format would be resumed wrong).
    """
    path = Path(path)
    if not path.exists():
        return {}
    cut_torn_line(path)
    lines: dict[str, list[dict[str, Any]]] = {}
    for number, record in iter_jsonl(path, BatchInputError):
        if not isinstance(record.get("custom_id"), str):
            raise BatchInputError(f"{path}:{number}: not a result line (no custom_id): {str(record)[:120]}")
        if not _is_result_line(record, fmt):
            raise BatchInputError(f"{path}:{number}: not a result line of this batch's input format ({fmt}); "
                                  f"write to another output: {str(record)[:120]}")
        lines.setdefault(record["custom_id"], []).append(record)
    return lines


def _is_result_line(record: dict[str, Any], fmt: BatchFormat) -> bool:
    if fmt == "openai":
        return "response" in record and "error" in record and isinstance(record["response"], dict | None)
    return record.get("status") in ("ok", "error")


def _is_done(record: dict[str, Any], fmt: BatchFormat) -> bool:
    """Whether a result line finishes its item: status "ok" (native), status_code 200 (OpenAI)."""
    if fmt == "openai":
        return record["response"] is not None and record["response"].get("status_code") == 200
    return record["status"] == "ok"


async def run_batch(cfg: ClientConfig, items: Sequence[Item], output: str | Path,
                    concurrency: int = DEFAULT_BATCH_CONCURRENCY, *, progress: bool = True,
                    via_gateway: bool = False) -> BatchSummary:
    """Process the items not yet done in `output`, `concurrency` at a time, appending one line per item.

    Native items are routed by the client, or by the gateway when `via_gateway`; OpenAI Batch items are sent as
    they are. Per-item failures (bad image, API errors after retries, routing errors) become error lines; the
    batch goes on. An error reaching the server at start-up (client-side router mode resolution) is raised.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    fmt = batch_format(items)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = {cid for cid, records in read_output(output, fmt).items() if any(_is_done(r, fmt) for r in records)}
    pending = [item for item in items if item.custom_id not in done]
    summary = BatchSummary(total=len(items), skipped=len(items) - len(pending))
    start = time.perf_counter()
    client = RouterClient(cfg)
    try:
        if fmt == "native" and not via_gateway:
            await client.start()  # the router mode, resolved once: a server that is not there fails here
        with append_jsonl(output) as append, \
                progress_bar(total=len(pending), desc="batch", unit="img", disable=not progress) as bar:
            todo = iter(pending)

            async def worker() -> None:
                # One shared iterator: each item is taken by exactly one worker.
                for item in todo:
                    item_start = time.perf_counter()
                    outcome = await _process_item(client, item, via_gateway)
                    append(outcome.line)
                    _count(summary, outcome, time.perf_counter() - item_start)
                    bar.set_postfix({**summary.by_expert, "failed": summary.failed}, refresh=False)
                    bar.update()

            await asyncio.gather(*(worker() for _ in range(min(concurrency, len(pending)))))
    finally:
        await client.close()
    summary.wall_s = time.perf_counter() - start
    return summary


async def _process_item(client: RouterClient, item: Item, via_gateway: bool) -> ItemOutcome:
    if isinstance(item, OpenAIBatchItem):
        return await _process_openai(client, item)
    process = client.process_via_gateway if via_gateway else client.process
    try:
        result = await process(item.image, item.prompt)
    except RouterClientError as exc:
        line = {"custom_id": item.custom_id, "status": "error",
                "error": {"type": type(exc).__name__, "message": str(exc)}}
        return ItemOutcome(line, error=type(exc).__name__)
    return ItemOutcome(_ok_record(item.custom_id, result), expert=result.decision.expert)


def _ok_record(custom_id: str, result: ProcessResult) -> dict[str, Any]:
    call = result.result.tool_call
    return {"custom_id": custom_id, "status": "ok", "expert": result.decision.expert,
            "confidence": result.decision.confidence, "fallback_reason": result.decision.fallback_reason,
            "answer": result.result.text, "tool_call": None if call is None else asdict(call),
            "timings": asdict(result.timings)}


async def _process_openai(client: RouterClient, item: OpenAIBatchItem) -> ItemOutcome:
    try:
        answer = await client.chat_completion(await _inline_local_images(client.config, item))
    except APIStatusError as exc:
        response = {"status_code": exc.status_code, "request_id": exc.request_id, "body": exc.body}
        return _openai_failure(item.custom_id, exc, response)
    except RouterClientError as exc:
        return _openai_failure(item.custom_id, exc, None)
    # The gateway's routed answers carry no x-request-id; the completion's own id names the request then.
    response = {"status_code": answer.status_code, "request_id": answer.request_id or answer.body.get("id"),
                "body": answer.body}
    line = {"id": _request_line_id(), "custom_id": item.custom_id, "response": response, "error": None}
    return ItemOutcome(line, expert=str(answer.body.get("model")))


async def _inline_local_images(cfg: ClientConfig, item: OpenAIBatchItem) -> dict[str, Any]:
    """The item's body with each local image file in place as a data URL (the server cannot read our files)."""
    if not item.local_images:
        return item.body
    body = copy.deepcopy(item.body)
    for image in item.local_images:
        # Decoding and PNG encoding take CPU time; off the event loop, other requests keep flowing.
        prepared = await asyncio.to_thread(prepare_image, image.path, max_pixels=cfg.max_pixels,
                                           max_image_pixels=cfg.max_image_pixels)
        body["messages"][image.message]["content"][image.part]["image_url"]["url"] = prepared.data_url
    return body


def _openai_failure(custom_id: str, exc: RouterClientError, response: dict[str, Any] | None) -> ItemOutcome:
    line = {"id": _request_line_id(), "custom_id": custom_id, "response": response,
            "error": {"code": type(exc).__name__, "message": str(exc)}}
    return ItemOutcome(line, error=type(exc).__name__)


def _request_line_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


def _count(summary: BatchSummary, outcome: ItemOutcome, seconds: float) -> None:
    if outcome.error is None:
        summary.ok += 1
        summary.by_expert[str(outcome.expert)] += 1
        summary.latencies_s.append(seconds)
    else:
        summary.failed += 1
        summary.by_error[outcome.error] += 1


@dataclass
class BatchArguments(ClientArguments):
    """The flags of `python -m router_client.batch`."""

    input: Path = field(kw_only=True, metadata={
        "help": "Folder of images, JSONL of {custom_id?, image, prompt?}, or an OpenAI Batch JSONL file of "
                "{custom_id, method, url, body} (told by its first line)."})
    output: Path = field(kw_only=True, metadata={
        "help": "Result JSONL in the input's format (appended; a rerun resumes it)."})
    via_gateway: bool = field(default=False, metadata={
        "help": "Native input: one model-auto request per screenshot to the routing gateway (python -m serving) "
                "instead of routing client-side (router, then expert). OpenAI Batch bodies always go as they are."})
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
        summary = asyncio.run(run_batch(cfg, items, args.output, args.concurrency, progress=args.progress,
                                        via_gateway=args.via_gateway))
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
