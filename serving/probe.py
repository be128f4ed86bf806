"""Warm-up and the no-op probe: every adapter answers one image request before users do (the first request pays
vLLM's lazy initialisation), and its answer to a fixed probe must differ from the base model's (an adapter that
silently does nothing is a known vLLM failure). The launcher runs it at start, the admin API on each adapter added.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from lora_router import openai_wire
from lora_router.images import prepare_image

# Largest top-logprob difference still taken as "the same answer" (bf16 noise is well below this).
PROBE_TOLERANCE = 1e-3
PROBE_TEXT = "Describe this screen."


class ProbeError(RuntimeError):
    """A probe request that vLLM did not answer usefully; the message names the model."""


@dataclass(frozen=True)
class ProbeAnswer:
    """A greedy answer to the probe: its text and the first token's top log-probabilities."""

    text: str
    top_logprobs: dict[str, float]

    def same_as(self, other: ProbeAnswer) -> bool:
        if self.text != other.text or self.top_logprobs.keys() != other.top_logprobs.keys():
            return False
        return all(abs(self.top_logprobs[t] - other.top_logprobs[t]) <= PROBE_TOLERANCE for t in self.top_logprobs)


def probe_image(seed: int, size: tuple[int, int] = (640, 480)) -> str:
    """A deterministic screenshot-like PNG as a data URL (stripes and blocks, no text needed)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, (245, 245, 245))
    draw = ImageDraw.Draw(img)
    for i in range(12):
        y = 20 + i * 36
        shade = (37 * (i + seed)) % 200
        draw.rectangle([20 + 9 * ((i * 7 + seed) % 11), y, size[0] - 20, y + 24], fill=(shade, 90, 255 - shade))
    return prepare_image(img).data_url


async def ask(session: aiohttp.ClientSession, api_url: str, model: str, image_url: str, text: str = PROBE_TEXT,
              max_tokens: int = 4, headers: dict[str, str] | None = None) -> ProbeAnswer:
    """One greedy image request to vLLM's API at `api_url` (the session, or `headers`, carry its key); the answer
    and its first token's top log-probabilities."""
    body = openai_wire.chat_request(model, [openai_wire.user_turn(image_url, text)], max_tokens, logprobs=True,
                                    top_logprobs=5)
    async with session.post(api_url + "/chat/completions", json=body, headers=headers) as r:
        if r.status != 200:
            raise ProbeError(f"{model}: probe request answered {r.status}: "
                             f"{openai_wire.error_message(await r.text())}")
        answer = await r.json()
    try:
        completion = openai_wire.read_completion(answer)
    except openai_wire.ResponseFormatError as exc:
        raise ProbeError(f"{model}: probe answer: {exc}") from None
    tops = completion.logprobs[0].top_logprobs if completion.logprobs else {}
    return ProbeAnswer(text=completion.text, top_logprobs=tops)


async def warm_up_and_probe(session: aiohttp.ClientSession, api_url: str, base: str, adapters: Sequence[str],
                            probe: bool = True) -> list[str]:
    """Warm the base model and `adapters` (vLLM names) up; with `probe`, return the adapters whose answer to the
    probe is the base model's (they change nothing), else an empty list."""
    names = [base, *adapters]
    probe_url = probe_image(seed=0)
    # One at a time first: the very first request pays vLLM's lazy initialisation (~20 s on CPU).
    answers = {name: await ask(session, api_url, name, probe_url) for name in names}
    # Then all at once on a fresh image, so the batched multi-LoRA path is warm too.
    burst_url = probe_image(seed=1)
    await asyncio.gather(*(ask(session, api_url, name, burst_url) for name in names))
    return [name for name in adapters if answers[name].same_as(answers[base])] if probe else []
