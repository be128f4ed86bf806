"""Validate a router adapter on a held-out classification set: accuracy, per-class precision/recall, confusion.

    # in-process: transformers + PEFT, greedy, rendered exactly as in training
    python -m training.validate_router --adapter checkpoints/tiny/router \\
        --data datasets/routing/eval-classification.jsonl --out runs/validate-router

The served adapter (vLLM) is validated by `python -m router_client.validate`, with the same data, report and
files: a train/serve mismatch shows up as two different numbers for the same adapter and data. This module
holds what both share: the eval set and its labels (eval_set), the report maths and the files (write_report).

Writes to --out: metrics.json (accuracy, per-class precision/recall/f1/support, confusion matrix), confusion.png,
predictions.jsonl; prints a table. Labels come from the adapter's manifest (else the data's router prompt);
an answer that is no label counts as a miss, in the matrix's "(other)" column.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from training.configuration import ConfigError, check_types, parse_command, run_command
from training.jsonl import write_jsonl
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


def eval_set(data: Path, adapter: Path | None = None, limit: int | None = None) -> tuple[list[Conversation], list[str]]:
    """The first `limit` lines of a classification eval set and its labels: the adapter manifest's, else the
    data's router prompt. DataError when the data is no classification data or disagrees with the adapter."""
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
    return conversations, labels


def write_report(out: Path, conversations: Sequence[Conversation], answers: Sequence[str], labels: Sequence[str], *,
                 mode: str, data: Path, adapter: Path | None, seconds: float) -> dict:
    """Score `answers` against the lines' gold answers and write metrics.json, confusion.png and
    predictions.jsonl to `out`; returns the metrics."""
    gold = [c.answer for c in conversations]
    report = classification_report(gold, answers, labels)
    report.update({"mode": mode, "data": str(data), "adapter": str(adapter) if adapter else None,
                   "seconds": round(seconds, 2)})
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    write_jsonl(out / "predictions.jsonl", (
        {"id": c.id, "image": str(c.images[0]) if c.images else None, "gold": g, "predicted": a, "correct": a == g}
        for c, g, a in zip(conversations, gold, answers)))
    plot_confusion(report, out / "confusion.png", mode)
    return report


def report_text(report: dict, out: Path) -> str:
    """What a validator prints: the mode, the table, and the files written."""
    return (f"{report['mode']}\n{format_report(report)}\n"
            f"wrote {out / 'metrics.json'}, {out / 'confusion.png'}, {out / 'predictions.jsonl'}")


def validate(data: Path, out: Path, adapter: Path, base: str | None = None, batch_size: int = 8,
             limit: int | None = None, min_pixels: int | None = None, max_pixels: int | None = None,
             quiet: bool = False) -> dict:
    """Run the adapter in-process on the eval set and write metrics.json, confusion.png and predictions.jsonl to
    `out`; returns the metrics."""
    conversations, labels = eval_set(data, adapter, limit)
    trained_min, trained_max = trained_pixels(adapter)
    start = time.perf_counter()
    answers = in_process_answers(conversations, adapter, base, batch_size, min_pixels=min_pixels or trained_min,
                                 max_pixels=max_pixels or trained_max, quiet=quiet)
    return write_report(out, conversations, answers, labels, mode=f"in-process {adapter}", data=data,
                        adapter=adapter, seconds=time.perf_counter() - start)


@dataclass
class EvalSetArguments:
    """The flags both validators share (in-process here, served in router_client.validate)."""

    data: Path = field(metadata={"help": "Classification JSONL (eval-classification.jsonl)."})
    out: Path = field(metadata={"help": "Folder for metrics.json, confusion.png and predictions.jsonl."})
    adapter: Path | None = field(default=None, metadata={
        "help": "Router adapter folder: labels and prompts from its manifest (served: default the data's)."})
    limit: int | None = field(default=None, metadata={"help": "Only the first N lines."})

    def __post_init__(self) -> None:
        check_types(self)
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")


@dataclass
class InProcessArguments:
    """How `python -m training.validate_router` runs the adapter with transformers + PEFT."""

    base: str | None = field(default=None, metadata={"help": "Base model folder (default: the manifest's)."})
    batch_size: int = field(default=8, metadata={"help": "Generation batch size."})
    min_pixels: int | None = field(default=None, metadata={"help": "Image limit (default: as trained)."})
    max_pixels: int | None = field(default=None, metadata={"help": "Image limit (default: as trained)."})

    def __post_init__(self) -> None:
        check_types(self)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


def run(eval_args: EvalSetArguments, args: InProcessArguments) -> int:
    """Validate in-process, write the files, print the report."""
    from training.inference import set_threads

    if eval_args.adapter is None:
        raise ConfigError("in-process validation needs --adapter (to validate a server: python -m "
                          "router_client.validate --base-url ...)")
    set_threads()
    report = validate(eval_args.data, eval_args.out, adapter=eval_args.adapter, base=args.base,
                      batch_size=args.batch_size, limit=eval_args.limit, min_pixels=args.min_pixels,
                      max_pixels=args.max_pixels)
    print(report_text(report, eval_args.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    eval_args, args = parse_command([EvalSetArguments, InProcessArguments], argv,
                                    prog="python -m training.validate_router", description=__doc__)
    return run_command(lambda: run(eval_args, args), runtime_errors=(ValueError, FileNotFoundError, RuntimeError))


if __name__ == "__main__":
    raise SystemExit(main())
