"""Validate a router adapter on a held-out classification set: accuracy, per-class precision/recall, confusion.

    # in-process: transformers + PEFT, greedy, rendered exactly as in training
    python -m training.validate_router --adapter checkpoints/tiny/router \\
        --data datasets/routing/eval-classification.jsonl --out runs/validate-router

The served adapter (vLLM) is validated by `python -m benchmarks.validate_served`, with the same data, report and
files: a train/serve mismatch shows up as two different numbers for the same adapter and data. This module
holds what both share: the eval set and its labels (eval_set), the report maths and the files (write_report).

Writes to --out: metrics.json (accuracy, per-class precision/recall/f1/support, confusion matrix, calibration),
confusion.png, reliability.png, predictions.jsonl; prints a table. Labels come from the adapter's manifest (else the
data's router prompt); an answer that is no label counts as a miss, in the matrix's "(other)" column.

Calibration: every line's label scores (the log-probability of each label's first token at the first answer step:
in-process from the model's logits, served from vLLM's logprobs as the client's one-token mode reads them) give
the expected calibration error, a reliability diagram, a temperature fitted on this set and the confidence
threshold that keeps accuracy on the routed screenshots at --target_accuracy, with the coverage that leaves.
--write_calibration stores temperature and threshold in the adapter's manifest, where the client, the batch CLI
and the gateway take them from; a manifest that already has them is also scored as it stands ("with_manifest").
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lora_router.configuration import ConfigError, check_types, parse_command, run_command
from lora_router.jsonl import write_jsonl
from lora_router.progress import progress
from training import calibration as cal
from training.llava_data import Conversation, DataError, describe, read_conversations

OTHER = "(other)"
# Accuracy the chosen threshold keeps on the routed screenshots, unless --target_accuracy says otherwise.
DEFAULT_TARGET_ACCURACY = 0.99


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


def calibration_section(scores: Sequence[Sequence[float]], gold: Sequence[str], answers: Sequence[str],
                        labels: Sequence[str], target_accuracy: float, data: str,
                        manifest: dict | None = None) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The report's calibration part: the fitted Calibration, and the manifest's (if any) scored on this set; with
    the (confidence, correct) curves the reliability diagram draws."""
    labels = list(labels)
    matrix = np.asarray(scores, dtype=np.float64).reshape(len(gold), len(labels))
    gold_index = np.array([labels.index(g) for g in gold])
    valid = np.array([a in labels for a in answers])
    fitted = cal.calibrate(matrix, gold_index, valid, target_accuracy, data=data)
    fitted.label_mix = {label: round(float(np.mean(gold_index == i)), 4) for i, label in enumerate(labels)}
    curves = {"raw": cal.routed_confidence(matrix, gold_index, valid, 1.0),
              f"temperature {fitted.temperature:g}": cal.routed_confidence(matrix, gold_index, valid,
                                                                           fitted.temperature)}
    section: dict = {"scores": "log-probability of each label's first token at the first answer step",
                     "fitted": fitted.to_dict(), "with_manifest": None}
    if manifest:
        confidence, correct = cal.routed_confidence(matrix, gold_index, valid, float(manifest["temperature"]))
        routed = cal.routed_at(confidence, correct, manifest.get("threshold"), manifest["target_accuracy"])
        section["with_manifest"] = {"temperature": manifest["temperature"], "threshold": manifest.get("threshold"),
                                    "fitted_on": manifest.get("data", ""), "routed_accuracy": round(routed.accuracy, 4),
                                    "coverage": round(routed.coverage, 4), "routed": routed.routed,
                                    "ece": round(cal.expected_calibration_error(confidence, correct), 4)}
        curves["manifest"] = (confidence, correct)
    return section, curves


def format_calibration(section: dict) -> str:
    """The calibration part of the printed report."""
    fitted = section["fitted"]
    threshold = "none reaches it" if fitted["threshold"] is None else f"{fitted['threshold']:.4f}"
    lines = [f"calibration: ECE {fitted['ece_raw']:.4f} raw, {fitted['ece']:.4f} at fitted temperature "
             f"{fitted['temperature']:g}; threshold for routed accuracy >= {fitted['target_accuracy']}: {threshold}, "
             f"coverage {fitted['coverage']:.3f}, routed accuracy {fitted['routed_accuracy']:.4f}"]
    manifest = section["with_manifest"]
    if manifest:
        lines.append(f"with the manifest's calibration (temperature {manifest['temperature']:g}, threshold "
                     f"{manifest['threshold']}): routed accuracy {manifest['routed_accuracy']:.4f}, coverage "
                     f"{manifest['coverage']:.3f} ({manifest['routed']} routed), ECE {manifest['ece']:.4f}")
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

def in_process_answers(conversations: Sequence[Conversation], adapter: Path, labels: Sequence[str],
                       base: str | None = None, batch_size: int = 8, max_new_tokens: int = 16,
                       min_pixels: int | None = None, max_pixels: int | None = None,
                       quiet: bool = False) -> tuple[list[str], list[list[float]] | None]:
    """Greedy answers of base + adapter with transformers/PEFT, rendered and sized as in training, and each line's
    label scores (None when two labels share a first token: one-token scores cannot tell them apart)."""
    from lora_router.manifest import AdapterManifest, model_fingerprint
    from training.inference import greedy_generate_scored, load_model, load_processor

    manifest = AdapterManifest.read(adapter)
    base_path = base or manifest.base_model
    if model_fingerprint(base_path) != manifest.base_model_fingerprint:
        raise ValueError(f"{base_path} is not the base model {adapter} was trained on "
                         f"(fingerprint {model_fingerprint(base_path)} != {manifest.base_model_fingerprint})")
    processor = load_processor(base_path)
    first = {label: processor.tokenizer(label, add_special_tokens=False)["input_ids"][0] for label in labels}
    scored = len(set(first.values())) == len(first)
    model = load_model(base_path, adapter)
    with progress(total=len(conversations), desc="in-process", unit="img", disable=quiet) as bar:
        answers, scores = greedy_generate_scored(
            model, processor, conversations, list(first.values()) if scored else (), max_new_tokens=max_new_tokens,
            batch_size=batch_size, min_pixels=min_pixels, max_pixels=max_pixels, progress=bar.update)
    return answers, scores if scored else None


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
    from lora_router.manifest import AdapterManifest

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
                 mode: str, data: Path, adapter: Path | None, seconds: float,
                 scores: Sequence[Sequence[float]] | None = None,
                 target_accuracy: float = DEFAULT_TARGET_ACCURACY, extra: dict | None = None) -> dict:
    """Score `answers` (and, given, the label `scores`) against the lines' gold answers and write metrics.json,
    confusion.png, reliability.png (with scores) and predictions.jsonl to `out`; returns the metrics."""
    from lora_router.manifest import AdapterManifest

    gold = [c.answer for c in conversations]
    report = classification_report(gold, answers, labels)
    report.update({"mode": mode, "data": str(data), "adapter": str(adapter) if adapter else None,
                   "seconds": round(seconds, 2), **(extra or {})})
    out.mkdir(parents=True, exist_ok=True)
    curves = None
    if scores is not None:
        manifest = AdapterManifest.read(adapter).calibration if adapter else None
        report["calibration"], curves = calibration_section(scores, gold, answers, labels, target_accuracy,
                                                            str(data), manifest)
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    write_jsonl(out / "predictions.jsonl", (
        {"id": c.id, "image": str(c.images[0]) if c.images else None, "gold": g, "predicted": a, "correct": a == g,
         **({"scores": dict(zip(labels, scores[i]))} if scores is not None else {})}
        for i, (c, g, a) in enumerate(zip(conversations, gold, answers))))
    plot_confusion(report, out / "confusion.png", mode)
    if curves:
        cal.plot_reliability(curves, out / "reliability.png", f"{mode}\n{len(gold)} screenshots")
    return report


def report_text(report: dict, out: Path) -> str:
    """What a validator prints: the mode, the table, calibration, and the files written."""
    files = ["metrics.json", "confusion.png"] + (["reliability.png"] if "calibration" in report else []) + \
        ["predictions.jsonl"]
    calibration = f"\n{format_calibration(report['calibration'])}" if "calibration" in report else ""
    return (f"{report['mode']}\n{format_report(report)}{calibration}\n"
            f"wrote {', '.join(str(out / f) for f in files)}")


def store_calibration(report: dict, adapter: Path | None) -> str:
    """Write the report's fitted calibration into the adapter's manifest; what to print."""
    from lora_router.manifest import AdapterManifest

    if adapter is None:
        raise ConfigError("--write_calibration needs --adapter (the manifest it writes to)")
    if "calibration" not in report:
        raise ConfigError("--write_calibration: no label scores (two labels share a first token), nothing to fit")
    manifest = AdapterManifest.read(adapter)
    manifest.calibration = report["calibration"]["fitted"]
    return f"wrote calibration (temperature, threshold) to {manifest.write(adapter)}"


def validate(data: Path, out: Path, adapter: Path, base: str | None = None, batch_size: int = 8,
             limit: int | None = None, min_pixels: int | None = None, max_pixels: int | None = None,
             quiet: bool = False, target_accuracy: float = DEFAULT_TARGET_ACCURACY) -> dict:
    """Run the adapter in-process on the eval set and write metrics.json, confusion.png, reliability.png and
    predictions.jsonl to `out`; returns the metrics."""
    conversations, labels = eval_set(data, adapter, limit)
    trained_min, trained_max = trained_pixels(adapter)
    start = time.perf_counter()
    answers, scores = in_process_answers(conversations, adapter, labels, base, batch_size,
                                         min_pixels=min_pixels or trained_min, max_pixels=max_pixels or trained_max,
                                         quiet=quiet)
    return write_report(out, conversations, answers, labels, mode=f"in-process {adapter}", data=data,
                        adapter=adapter, seconds=time.perf_counter() - start, scores=scores,
                        target_accuracy=target_accuracy)


@dataclass
class EvalSetArguments:
    """The flags both validators share (in-process here, served in benchmarks.validate_served)."""

    data: Path = field(metadata={"help": "Classification JSONL (eval-classification.jsonl)."})
    out: Path = field(metadata={"help": "Folder for metrics.json, confusion.png and predictions.jsonl."})
    adapter: Path | None = field(default=None, metadata={
        "help": "Router adapter folder: labels and prompts from its manifest (served: default the data's)."})
    limit: int | None = field(default=None, metadata={"help": "Only the first N lines."})
    target_accuracy: float = field(default=DEFAULT_TARGET_ACCURACY, metadata={
        "help": "Accuracy on the routed screenshots the confidence threshold must keep."})
    write_calibration: bool = field(default=False, metadata={
        "help": "Store the fitted temperature and threshold in --adapter's manifest (serving then uses them)."})

    def __post_init__(self) -> None:
        check_types(self)
        problems = []
        if self.limit is not None and self.limit < 1:
            problems.append(f"limit must be >= 1, got {self.limit}")
        if not 0.0 < self.target_accuracy <= 1.0:
            problems.append(f"target_accuracy must be within (0, 1], got {self.target_accuracy}")
        if self.write_calibration and self.adapter is None:
            problems.append("write_calibration needs --adapter (the manifest it writes to)")
        if problems:
            raise ConfigError("; ".join(problems))


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
                          "benchmarks.validate_served --base-url ...)")
    set_threads()
    report = validate(eval_args.data, eval_args.out, adapter=eval_args.adapter, base=args.base,
                      batch_size=args.batch_size, limit=eval_args.limit, min_pixels=args.min_pixels,
                      max_pixels=args.max_pixels, target_accuracy=eval_args.target_accuracy)
    print(report_text(report, eval_args.out))
    if eval_args.write_calibration:
        print(store_calibration(report, eval_args.adapter))
    return 0


def main(argv: list[str] | None = None) -> int:
    eval_args, args = parse_command([EvalSetArguments, InProcessArguments], argv,
                                    prog="python -m training.validate_router", description=__doc__)
    return run_command(lambda: run(eval_args, args), runtime_errors=(ValueError, FileNotFoundError, RuntimeError))


if __name__ == "__main__":
    raise SystemExit(main())
