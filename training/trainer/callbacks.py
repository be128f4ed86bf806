"""What the trainer adds to transformers.Trainer's loop: the classifier's greedy accuracy at each evaluation, and
log lines (not a redrawn bar) when stderr is not a terminal."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from transformers import TrainerCallback

from training.llava_data import Conversation

log = logging.getLogger("training.trainer")


class GenerationAccuracy(TrainerCallback):
    """At each evaluation, greedy-decode the eval set as vLLM would answer it and add eval_accuracy,
    eval_accuracy_per_class and eval_count to the evaluation's metrics (and to its entry in the log history)."""

    def __init__(self, processor, conversations: Sequence[Conversation], labels: Sequence[str], *,
                 max_new_tokens: int, min_pixels: int | None, max_pixels: int | None):
        self.processor = processor
        self.conversations = list(conversations)
        self.labels = list(labels)
        self.max_new_tokens = max_new_tokens
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels

    def accuracy(self, model, batch_size: int) -> dict:
        """eval_accuracy (exact match), eval_accuracy_per_class and eval_count of `model` on the eval set."""
        from training.inference import greedy_generate

        answers = greedy_generate(model, self.processor, self.conversations, max_new_tokens=self.max_new_tokens,
                                  batch_size=batch_size, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        gold = [c.answer for c in self.conversations]
        right = [a == g for a, g in zip(answers, gold)]
        return {"eval_accuracy": round(sum(right) / len(gold), 6),
                "eval_accuracy_per_class": {
                    label: round(sum(r for r, g in zip(right, gold) if g == label) / max(1, gold.count(label)), 6)
                    for label in self.labels},
                "eval_count": len(gold)}

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        found = self.accuracy(model, args.per_device_eval_batch_size)
        metrics.update(found)
        # Trainer logged this evaluation just before calling back: complete that entry, which metrics.json reads.
        last = state.log_history[-1] if state.log_history else {}
        if "eval_loss" in last and last.get("step") == state.global_step:
            last.update(found)
        log.info("eval at step %d: %s", state.global_step, json.dumps(found))


class LogLines(TrainerCallback):
    """Trainer's logs (loss, learning rate, eval metrics) as log lines: the bar-less stand-in for PrinterCallback."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        shown = {k: round(v, 6) if isinstance(v, float) else v for k, v in (logs or {}).items() if k != "total_flos"}
        log.info("step %d/%d: %s", state.global_step, state.max_steps, json.dumps(shown))
