"""The seed's two baselines in plain transformers + PEFT, one screenshot at a time, for the vLLM comparison.

    two-stage inference  per screenshot: PeftModel.from_pretrained(base, router), classify, unload(),
                         PeftModel.from_pretrained(base, expert), generate, unload()
    single-load          once: the router and every expert loaded as named adapters; per screenshot:
                         set_adapter(router), classify, set_adapter(expert), generate

Both render prompts exactly as training and vLLM do (training.llava_data.encode, the same pixel limits), classify
like the client's one-token mode (one forward pass, the label whose first token scores highest) and generate the
same number of expert tokens greedily as the vLLM phases ask for. The base model loads once, outside the timing.
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


def run_baselines(model_dir: str, processor, deployment: DeploymentConfig, items: Sequence[BenchItem],
                  device: str, threads: int) -> list[BaselineResult]:
    """Both baselines on `items` (plus one unmeasured warm-up screenshot each, the first item), with `threads`
    torch threads (the vLLM CPU worker's count, so both get the same cores)."""
    import torch
    from peft import PeftModel

    set_threads(threads)
    dtype = "bfloat16" if device == "cuda" else "float32"
    base = load_model(model_dir, dtype=dtype).to(device)
    runner = _Runner(processor, deployment, device)
    images = _images(items)
    paths = {a.name: str(deployment.adapter_path(a)) for a in deployment.adapters}
    router = deployment.router.name

    def two_stage(image, item: BenchItem) -> tuple[str, int]:
        nonlocal base
        model = PeftModel.from_pretrained(base, paths[router])
        label = runner.classify(model, image)
        base = model.unload()
        model = PeftModel.from_pretrained(base, paths[label])
        tokens = runner.generate(model, image, item.prompt, item.max_tokens)
        base = model.unload()
        return label, tokens

    def measure(name: str, step) -> BaselineResult:
        step(images[0], items[0])  # warm-up
        seconds, tokens, correct = [], 0, 0
        start = time.perf_counter()
        for image, item in zip(images, items):
            t = time.perf_counter()
            label, n = step(image, item)
            seconds.append(time.perf_counter() - t)
            tokens += n
            correct += label == item.kind
        duration = time.perf_counter() - start
        return BaselineResult(name=name, device=device, dtype=dtype, threads=torch.get_num_threads(),
                              screenshots=len(items), duration_s=duration,
                              screenshots_per_s=len(items) / duration, seconds_per_screenshot=seconds,
                              output_tokens=tokens, routing_accuracy=correct / len(items))

    results = [measure(TWO_STAGE_INFERENCE, two_stage)]

    model = PeftModel.from_pretrained(base, paths[router], adapter_name=router)
    for expert in deployment.labels:
        model.load_adapter(paths[expert], adapter_name=expert)
    model.eval()

    def single_load(image, item: BenchItem) -> tuple[str, int]:
        model.set_adapter(router)
        label = runner.classify(model, image)
        model.set_adapter(label)
        return label, runner.generate(model, image, item.prompt, item.max_tokens)

    results.append(measure(SINGLE_LOAD, single_load))
    return results
