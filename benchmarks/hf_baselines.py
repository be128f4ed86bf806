"""The seed's two baselines in plain transformers + PEFT, one screenshot at a time, for the vLLM comparison.

    two-stage inference  per screenshot: PeftModel.from_pretrained(base, router), classify, unload(),
                         PeftModel.from_pretrained(base, expert), generate, unload()
    single-load          once: the router and every expert loaded as named adapters; per screenshot:
                         set_adapter(router), classify, set_adapter(expert), generate

Both render prompts exactly as training and vLLM do (training.llava_data.encode, the same pixel limits), classify
like the client's one-token mode (one forward pass, the label whose first token scores highest) and generate the
same number of expert tokens greedily as the vLLM phases ask for. The base model loads once, outside the timing;
the benchmark runs both once per round of its compared phases.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.pool import BenchItem
from lora_router.deployment import DeploymentConfig
from lora_router.prompts import ROUTER_USER_PROMPT, router_system_prompt
from training.inference import load_model, set_threads
from training.llava_data import collate, encode, image_kwargs
from training.tasks import build_example

TWO_STAGE_INFERENCE = "hf-two-stage-inference"
SINGLE_LOAD = "hf-single-load"


@dataclass
class BaselineResult:
    """One baseline's run: per-screenshot seconds, throughput and routing accuracy."""

    name: str
    device: str
    dtype: str
    threads: int
    screenshots: int
    duration_s: float
    screenshots_per_s: float
    seconds_per_screenshot: list[float]
    output_tokens: int
    routing_accuracy: float
    cpu_s: float = 0.0  # CPU seconds of this process over the measured screenshots (the baselines run in it)
    round: int = 1  # which round of the compared phases it ran after


class _Runner:
    """Shared pieces: the processor, the label first tokens, prompt encoding, classify and generate."""

    def __init__(self, processor, deployment: DeploymentConfig, device: str) -> None:
        self.processor = processor
        self.device = device
        self.labels = deployment.labels
        tok = processor.tokenizer
        self.first_ids = [tok(label, add_special_tokens=False)["input_ids"][0] for label in self.labels]
        self.eos = tok.convert_tokens_to_ids("<|im_end|>")
        self.pad = tok.pad_token_id
        self.pixels = image_kwargs(deployment.engine.min_pixels, deployment.engine.max_pixels)
        self.system = router_system_prompt(self.labels)

    def _batch(self, messages: list[dict], image) -> dict:
        features = encode(self.processor, messages, [image], None, self.pixels)
        batch = collate([features], self.pad, padding_side="left")
        batch.pop("labels")
        return {k: v.to(self.device) for k, v in batch.items()}

    def classify(self, model, image) -> str:
        import torch

        messages = [{"role": "system", "content": self.system},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ROUTER_USER_PROMPT}]}]
        with torch.no_grad():
            logits = model(**self._batch(messages, image)).logits[0, -1]
        scores = logits[self.first_ids]
        return self.labels[int(scores.argmax())]

    def generate(self, model, image, prompt: str, max_tokens: int) -> int:
        """Greedy expert answer; returns the number of generated tokens."""
        import torch

        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        batch = self._batch(messages, image)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False, eos_token_id=self.eos,
                                 pad_token_id=self.pad)
        return int(out.shape[1] - batch["input_ids"].shape[1])


def _images(items: Sequence[BenchItem]) -> list:
    # The same screens as the items (PIL images regenerated from their seeds rather than decoded from PNG).
    return [build_example(item.kind, item.seed).image for item in items]


class Baselines:
    """Both baselines, ready to measure: the base model loaded once (outside every timing), the images built; each
    `run()` is one round of both, on `items` plus one unmeasured warm-up screenshot each (the first item), with
    `threads` torch threads (the vLLM CPU worker's count, so both get the same cores)."""

    def __init__(self, model_dir: str, processor, deployment: DeploymentConfig, items: Sequence[BenchItem],
                 device: str, threads: int) -> None:
        set_threads(threads)
        self.device = device
        self.dtype = "bfloat16" if device == "cuda" else "float32"
        self.base = load_model(model_dir, dtype=self.dtype).to(device)
        self.runner = _Runner(processor, deployment, device)
        self.items = list(items)
        self.images = _images(items)
        self.paths = {a.name: str(deployment.adapter_path(a)) for a in deployment.adapters}
        self.router = deployment.router.name
        self.labels = deployment.labels

    def _measure(self, name: str, step, round_: int) -> BaselineResult:
        import torch

        step(self.images[0], self.items[0])  # warm-up
        seconds, tokens, correct = [], 0, 0
        start, cpu = time.perf_counter(), time.process_time()
        for image, item in zip(self.images, self.items):
            t = time.perf_counter()
            label, n = step(image, item)
            seconds.append(time.perf_counter() - t)
            tokens += n
            correct += label == item.kind
        duration, cpu = time.perf_counter() - start, time.process_time() - cpu
        return BaselineResult(name=name, device=self.device, dtype=self.dtype, threads=torch.get_num_threads(),
                              screenshots=len(self.items), duration_s=duration,
                              screenshots_per_s=len(self.items) / duration, seconds_per_screenshot=seconds,
                              output_tokens=tokens, routing_accuracy=correct / len(self.items), cpu_s=cpu,
                              round=round_)

    def run(self, round_: int = 1) -> list[BaselineResult]:
        from peft import PeftModel

        runner = self.runner

        def two_stage(image, item: BenchItem) -> tuple[str, int]:
            model = PeftModel.from_pretrained(self.base, self.paths[self.router])
            label = runner.classify(model, image)
            self.base = model.unload()
            model = PeftModel.from_pretrained(self.base, self.paths[label])
            tokens = runner.generate(model, image, item.prompt, item.max_tokens)
            self.base = model.unload()
            return label, tokens

        results = [self._measure(TWO_STAGE_INFERENCE, two_stage, round_)]
        # Loading every adapter once is what this baseline saves: outside its timing.
        model = PeftModel.from_pretrained(self.base, self.paths[self.router], adapter_name=self.router)
        for expert in self.labels:
            model.load_adapter(self.paths[expert], adapter_name=expert)
        model.eval()

        def single_load(image, item: BenchItem) -> tuple[str, int]:
            model.set_adapter(self.router)
            label = runner.classify(model, image)
            model.set_adapter(label)
            return label, runner.generate(model, image, item.prompt, item.max_tokens)

        results.append(self._measure(SINGLE_LOAD, single_load, round_))
        self.base = model.unload()  # the next round's two-stage baseline starts from the bare base again
        return results
