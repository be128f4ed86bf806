"""Validate a router adapter on a held-out classification set: accuracy, per-class precision/recall, confusion.

    # in-process: transformers + PEFT, greedy, rendered exactly as in training
    python -m training.validate_router --adapter checkpoints/tiny/router \\
        --data datasets/routing/eval-classification.jsonl --out runs/validate-router

    # against the served adapter (OpenAI-compatible endpoint; vLLM)
    python -m training.validate_router --adapter checkpoints/tiny/router \\
        --data datasets/routing/eval-classification.jsonl --out runs/validate-router-served \\
        --base-url http://127.0.0.1:8000/v1 --model router [--api-key KEY] [--structured-outputs]

Both modes send the same thing: the line's system prompt, then a user turn [image, text] (the `<image>\\n`
prefix puts the image first). Served requests are `POST {base_url}/chat/completions` with temperature 0 and
the image as a PNG data URL; `--structured-outputs` adds `"structured_outputs": {"choice": labels}`. A
train/serve mismatch shows up as two different numbers for the same adapter and data.

Writes to --out: metrics.json (accuracy, per-class precision/recall/f1/support, confusion matrix), confusion.png,
predictions.jsonl; prints a table. Labels come from the adapter's manifest (else the data's router prompt);
an answer that is no label counts as a miss, in the matrix's "(other)" column.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from training.configuration import ConfigError, check_types, parse_command, run_command
from training.llava_data import Conversation, DataError, describe, read_conversations
from training.progress import progress

OTHER = "(other)"


# ----------------------------------------------------------------------------------------------- metrics

def classification_report(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy, per-class precision/recall/f1/support and the confusion matrix (rows gold, columns predicted;
    the last column counts answers that are not labels)."""
    labels = list(labels)
    columns = labels + [OTHER]
    matrix = [[0] * len(columns) for _ in labels]
    for g, p in zip(gold, predicted):
        if g not in labels:
            raise ValueError(f"gold answer {g!r} is not a label ({', '.join(labels)})")
        matrix[labels.index(g)][columns.index(p) if p in labels else len(labels)] += 1
    per_class = {}
    for i, label in enumerate(labels):
        tp = matrix[i][i]
        support = sum(matrix[i])
        predicted_as = sum(row[i] for row in matrix)
        precision = tp / predicted_as if predicted_as else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
                            "support": support}
    correct = sum(matrix[i][i] for i in range(len(labels)))
    return {"accuracy": round(correct / max(1, len(gold)), 4), "correct": correct, "count": len(gold),
            "labels": labels, "per_class": per_class,
            "confusion_matrix": {"rows_gold": labels, "columns_predicted": columns, "matrix": matrix}}


def format_report(report: dict) -> str:
    """The report as a plain-text table: per-class metrics, then the confusion matrix."""
    labels = report["labels"]
    width = max(len(OTHER), *map(len, labels), len("class"))
    lines = [f"accuracy {report['accuracy']:.4f} ({report['correct']}/{report['count']})", "",
             f"{'class':<{width}} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}"]
    for label in labels:
        m = report["per_class"][label]
        lines.append(f"{label:<{width}} {m['precision']:>9.3f} {m['recall']:>7.3f} {m['f1']:>7.3f} {m['support']:>8}")
    cm = report["confusion_matrix"]
    cols = cm["columns_predicted"]
    cell = max(6, *map(len, cols))
    lines += ["", "confusion (rows: gold, columns: predicted)",
              f"{'':<{width}} " + " ".join(f"{c:>{cell}}" for c in cols)]
    for label, row in zip(cm["rows_gold"], cm["matrix"]):
        lines.append(f"{label:<{width}} " + " ".join(f"{v:>{cell}}" for v in row))
    return "\n".join(lines)


def plot_confusion(report: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = report["confusion_matrix"]
    rows, cols, matrix = cm["rows_gold"], cm["columns_predicted"], cm["matrix"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(cols), 1.4 + 1.1 * len(rows)))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    peak = max(max(r) for r in matrix) or 1
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black")
    ax.set_title(f"{title}\naccuracy {report['accuracy']:.3f} ({report['correct']}/{report['count']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- predictions

def image_data_url(path: Path) -> str:
    """The image as a PNG data URL (decoded and re-encoded losslessly: the pixels the in-process run sees)."""
    from PIL import Image

    with Image.open(path) as img:
        buffer = io.BytesIO()
        img.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def request_body(conversation: Conversation, model: str, labels: Sequence[str] | None, max_tokens: int) -> dict:
    """The chat request for one line: system prompt, then user [image_url..., text] in the line's order."""
    parts = iter([{"type": "image_url", "image_url": {"url": image_data_url(p)}} for p in conversation.images])
    messages = conversation.messages()
    for part_index, part in enumerate(messages[-1]["content"]):
        if part["type"] == "image":
            messages[-1]["content"][part_index] = next(parts)
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    if labels:
        body["structured_outputs"] = {"choice": list(labels)}
    return body


async def served_answers(conversations: Sequence[Conversation], base_url: str, model: str, api_key: str | None,
                         labels: Sequence[str] | None, max_tokens: int = 16, concurrency: int = 8,
                         timeout_s: float = 120.0) -> list[str]:
    """Answers of the served model to each line (concurrent requests; an HTTP error raises naming the line)."""
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    semaphore = asyncio.Semaphore(concurrency)
    url = base_url.rstrip("/") + "/chat/completions"

    async def one(session, conversation: Conversation) -> str:
        async with semaphore:
            body = request_body(conversation, model, labels, max_tokens)
            async with session.post(url, json=body) as response:
                if response.status != 200:
                    raise RuntimeError(f"{conversation.source}: {url} answered HTTP {response.status}: "
                                       f"{(await response.text())[:300]}")
                data = await response.json()
        return (data["choices"][0]["message"]["content"] or "").strip()

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        return list(await asyncio.gather(*(one(session, c) for c in conversations)))


def in_process_answers(conversations: Sequence[Conversation], adapter: Path, base: str | None = None,
                       batch_size: int = 8, max_new_tokens: int = 16, min_pixels: int | None = None,
                       max_pixels: int | None = None, quiet: bool = False) -> list[str]:
    """Greedy answers of base + adapter with transformers/PEFT, rendered and sized as in training."""
    from training.inference import greedy_generate, load_model, load_processor
    from training.manifest import AdapterManifest, model_fingerprint

    manifest = AdapterManifest.read(adapter)
    base_path = base or manifest.base_model
    if model_fingerprint(base_path) != manifest.base_model_fingerprint:
        raise ValueError(f"{base_path} is not the base model {adapter} was trained on "
                         f"(fingerprint {model_fingerprint(base_path)} != {manifest.base_model_fingerprint})")
    processor = load_processor(base_path)
    model = load_model(base_path, adapter)
    with progress(total=len(conversations), desc="in-process", unit="img", disable=quiet) as bar:
        return greedy_generate(model, processor, conversations, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, min_pixels=min_pixels, max_pixels=max_pixels,
                               progress=bar.update)


def trained_pixels(adapter: Path) -> tuple[int | None, int | None]:
    """The image limits the adapter was trained with (training_args.json), if recorded."""
    path = Path(adapter) / "training_args.json"
    if not path.exists():
        return None, None
    resolved = json.loads(path.read_text()).get("resolved", {})
    return resolved.get("min_pixels"), resolved.get("max_pixels")


def validate(data: Path, out: Path, adapter: Path | None = None, base_url: str | None = None,
             model: str = "router", api_key: str | None = None, structured_outputs: bool = False,
             base: str | None = None, batch_size: int = 8, concurrency: int = 8, limit: int | None = None,
             min_pixels: int | None = None, max_pixels: int | None = None, quiet: bool = False) -> dict:
    """Run the validation (served if base_url, else in-process) and write metrics.json, confusion.png and
    predictions.jsonl to `out`; returns the metrics. `quiet`: no progress bar."""
    from training.manifest import AdapterManifest

    conversations = read_conversations(data)
    if limit:
        conversations = conversations[:limit]
    manifest = AdapterManifest.read(adapter) if adapter else None
    labels = manifest.labels if manifest and manifest.labels else None
    info = describe(conversations, labels=labels)
    labels = labels or info.labels
    if not labels:
        raise DataError(f"{data}: not classification data (no router system prompt) and no adapter manifest labels")
    if manifest and manifest.system_prompt and info.system_prompt != manifest.system_prompt:
        raise DataError(f"{data}: its system prompt differs from the one {adapter} was trained with")
    start = time.perf_counter()
    if base_url:
        mode = f"served {model} at {base_url}" + (" (structured outputs)" if structured_outputs else "")
        answers = asyncio.run(served_answers(conversations, base_url, model, api_key,
                                             labels if structured_outputs else None, concurrency=concurrency))
    else:
        if adapter is None:
            raise ValueError("in-process validation needs --adapter")
        trained_min, trained_max = trained_pixels(adapter)
        mode = f"in-process {adapter}"
        answers = in_process_answers(conversations, adapter, base, batch_size, min_pixels=min_pixels or trained_min,
                                     max_pixels=max_pixels or trained_max, quiet=quiet)
    seconds = time.perf_counter() - start
    gold = [c.answer for c in conversations]
    report = classification_report(gold, answers, labels)
    report.update({"mode": mode, "data": str(data), "adapter": str(adapter) if adapter else None,
                   "seconds": round(seconds, 2)})
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    with (out / "predictions.jsonl").open("w") as f:
        for c, g, a in zip(conversations, gold, answers):
            f.write(json.dumps({"id": c.id, "image": str(c.images[0]) if c.images else None, "gold": g,
                                "predicted": a, "correct": a == g}) + "\n")
    plot_confusion(report, out / "confusion.png", mode)
    return report


@dataclass
class ValidateRouterArguments:
    """The flags of `python -m training.validate_router`."""

    data: Path = field(metadata={"help": "Classification JSONL (eval-classification.jsonl)."})
    out: Path = field(metadata={"help": "Folder for metrics.json, confusion.png and predictions.jsonl."})
    adapter: Path | None = field(default=None, metadata={
        "help": "Router adapter folder (labels and prompts from its manifest; required in-process)."})
    base_url: str | None = field(default=None, metadata={
        "help": "OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1 (served mode); without it the adapter "
                "runs in-process."})
    model: str = field(default="router", metadata={"help": "Served adapter name."})
    api_key: str | None = field(default=None, metadata={"help": "Bearer key (default: $LORA_ROUTER_API_KEY)."})
    structured_outputs: bool = field(default=False, metadata={
        "help": "Served mode: constrain answers to the labels (structured_outputs.choice)."})
    base: str | None = field(default=None, metadata={
        "help": "In-process: base model folder (default: the manifest's)."})
    batch_size: int = field(default=8, metadata={"help": "In-process batch size."})
    concurrency: int = field(default=8, metadata={"help": "Served: requests in flight."})
    limit: int | None = field(default=None, metadata={"help": "Only the first N lines."})
    min_pixels: int | None = field(default=None, metadata={"help": "In-process image limit (default: as trained)."})
    max_pixels: int | None = field(default=None, metadata={"help": "In-process image limit (default: as trained)."})

    def __post_init__(self) -> None:
        check_types(self)
        if self.base_url is None and self.adapter is None:
            raise ConfigError("in-process validation needs --adapter (or give --base-url to validate a server)")
        self.api_key = self.api_key or os.environ.get("LORA_ROUTER_API_KEY")


def run(args: ValidateRouterArguments) -> int:
    """Validate, write the files, print the report."""
    from training.inference import set_threads

    set_threads()
    report = validate(args.data, args.out, adapter=args.adapter, base_url=args.base_url, model=args.model,
                      api_key=args.api_key, structured_outputs=args.structured_outputs, base=args.base,
                      batch_size=args.batch_size, concurrency=args.concurrency, limit=args.limit,
                      min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    print(report["mode"])
    print(format_report(report))
    print(f"wrote {args.out / 'metrics.json'}, {args.out / 'confusion.png'}, {args.out / 'predictions.jsonl'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    (args,) = parse_command(ValidateRouterArguments, argv, prog="python -m training.validate_router",
                            description=__doc__)
    return run_command(lambda: run(args), runtime_errors=(ValueError, FileNotFoundError, RuntimeError))


if __name__ == "__main__":
    raise SystemExit(main())
