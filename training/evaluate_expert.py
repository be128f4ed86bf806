"""Score an expert adapter on its task against the base model without it, on the same eval set.

    python -m training.evaluate_expert --adapter checkpoints/tiny/calendar --data datasets/calendar/eval.jsonl \\
        [--out runs/eval-calendar] [--limit 50] [--max-new-tokens N]

The data is an expert dataset (`python -m training.expert_datasets`): each line's metadata holds its task
kind and scoring target, and training.tasks.score grades a reply. Both models answer greedily with the same
rendering (training.llava_data; the adapter's trained image limits); the report gives the mean task metrics
of each, the score of each task the lines ask (a calendar's date, time slot or highlighted day; a provider by name
or by position) and the difference in "score". Writes metrics.json and predictions.jsonl to --out when given.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from lora_router.configuration import ConfigError, check_types, parse_command, run_command
from lora_router.jsonl import write_jsonl
from lora_router.progress import progress
from training.llava_data import DataError, read_conversations
from training.tasks import score


def mean_scores(conversations, answers) -> dict[str, float]:
    """Mean of every metric training.tasks.score returns, over the lines."""
    totals: dict[str, float] = defaultdict(float)
    for conversation, answer in zip(conversations, answers):
        meta = conversation.metadata
        for name, value in score(meta["task_type"], answer, meta["target"]).items():
            totals[name] += value
    return {name: round(value / len(conversations), 4) for name, value in totals.items()}


def scores_by_task(conversations, answers) -> dict[str, dict[str, float]]:
    """mean_scores of the lines of each task their targets name (training.tasks), with "count"; {} when the lines
    name fewer than two tasks."""
    groups: dict[str, list] = defaultdict(list)
    for conversation, answer in zip(conversations, answers):
        task = conversation.metadata["target"].get("task")
        if task:
            groups[task].append((conversation, answer))
    if len(groups) < 2:
        return {}
    return {task: {"count": len(pairs), **mean_scores(*zip(*pairs))} for task, pairs in sorted(groups.items())}


def evaluate(adapter: Path, data: Path, out: Path | None = None, base: str | None = None, limit: int | None = None,
             max_new_tokens: int | None = None, batch_size: int = 8, quiet: bool = False) -> dict:
    """Greedy answers of base and base + adapter on `data`, scored with training.tasks.score."""
    from lora_router.manifest import AdapterManifest, model_fingerprint
    from training.inference import greedy_generate, load_model, load_processor
    from training.validate_router import trained_pixels

    conversations = read_conversations(data)[:limit] if limit else read_conversations(data)
    for c in conversations:
        if not {"task_type", "target"} <= set(c.metadata):
            raise DataError(f"{c.source}: metadata lacks task_type/target (not an expert dataset line)")
    manifest = AdapterManifest.read(adapter)
    base_path = base or manifest.base_model
    if model_fingerprint(base_path) != manifest.base_model_fingerprint:
        raise ValueError(f"{base_path} is not the base model {adapter} was trained on")
    processor = load_processor(base_path)
    tok = processor.tokenizer
    longest = max(len(tok(c.answer, add_special_tokens=False)["input_ids"]) for c in conversations)
    max_new_tokens = max_new_tokens or min(1024, int(longest * 1.25) + 4)
    min_pixels, max_pixels = trained_pixels(adapter)
    model = load_model(base_path, adapter)
    results, by_task, predictions = {}, {}, {}
    for name in ("base", "adapter"):
        with progress(total=len(conversations), desc=name, unit="ex", disable=quiet) as bar:
            if name == "base":
                with model.disable_adapter():
                    answers = greedy_generate(model, processor, conversations, max_new_tokens=max_new_tokens,
                                              batch_size=batch_size, min_pixels=min_pixels, max_pixels=max_pixels,
                                              progress=bar.update)
            else:
                answers = greedy_generate(model, processor, conversations, max_new_tokens=max_new_tokens,
                                          batch_size=batch_size, min_pixels=min_pixels, max_pixels=max_pixels,
                                          progress=bar.update)
        results[name] = mean_scores(conversations, answers)
        by_task[name] = scores_by_task(conversations, answers)
        predictions[name] = answers
    kinds = sorted({c.metadata["task_type"] for c in conversations})
    report = {"adapter": str(adapter), "data": str(data), "task": kinds[0] if len(kinds) == 1 else kinds,
              "count": len(conversations), "max_new_tokens": max_new_tokens, "base": results["base"],
              "adapter_scores": results["adapter"],
              "score_gain": round(results["adapter"]["score"] - results["base"]["score"], 4),
              "by_task": {task: {"count": scores["count"], "base": by_task["base"][task], "adapter": scores}
                          for task, scores in by_task["adapter"].items()}}
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
        answers = zip(conversations, predictions["base"], predictions["adapter"])
        write_jsonl(out / "predictions.jsonl",
                    ({"id": c.id, "gold": c.answer, "base": b, "adapter": a} for c, b, a in answers))
    return report


def format_report(report: dict) -> str:
    """The report as a table: each metric of the base model and of the adapter, then the score gain."""
    base, adapter = report["base"], report["adapter_scores"]
    lines = [f"{report['task']} on {report['count']} eval lines ({report['data']})",
             f"{'metric':<16} {'base':>8} {'adapter':>8}"]
    lines += [f"{n:<16} {base.get(n, 0):>8.4f} {adapter.get(n, 0):>8.4f}" for n in sorted(set(base) | set(adapter))]
    lines += [f"{'score ' + task:<16} {scores['base']['score']:>8.4f} {scores['adapter']['score']:>8.4f}  "
              f"({scores['count']} lines)" for task, scores in report.get("by_task", {}).items()]
    return "\n".join(lines + [f"score gain {report['score_gain']:+.4f}"])


@dataclass
class EvaluateExpertArguments:
    """The flags of `python -m training.evaluate_expert`."""

    adapter: Path = field(metadata={"help": "Expert adapter folder."})
    data: Path = field(metadata={"help": "Expert eval JSONL (training.expert_datasets)."})
    out: Path | None = field(default=None, metadata={"help": "Folder for metrics.json and predictions.jsonl."})
    base: str | None = field(default=None, metadata={"help": "Base model folder (default: the adapter manifest's)."})
    limit: int | None = field(default=None, metadata={"help": "Only the first N lines."})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": "Greedy tokens per answer (default: 1.25 x the longest gold answer)."})
    batch_size: int = field(default=8, metadata={"help": "Generation batch size."})

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("limit", "max_new_tokens", "batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


def run(args: EvaluateExpertArguments) -> int:
    """Score the adapter and the base model; print the table."""
    from training.inference import set_threads

    set_threads()
    report = evaluate(args.adapter, args.data, args.out, args.base, args.limit, args.max_new_tokens, args.batch_size)
    print(format_report(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    (args,) = parse_command(EvaluateExpertArguments, argv, prog="python -m training.evaluate_expert",
                            description=__doc__)
    return run_command(lambda: run(args), runtime_errors=(ValueError, FileNotFoundError))


if __name__ == "__main__":
    raise SystemExit(main())
