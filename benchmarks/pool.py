"""Screenshots for the benchmark: drawn from the synthetic generators, each one new to the server.

Every item has its own seed (training.expert_datasets.sample_seed with the split name "bench", so no training or
eval screen comes back), its class drawn from the class mix (or fixed; the draw depends only on the seed and the
number of items, so phases of one size get the same class sequence and compare like with like on different
screenshots), the expert's task prompt and gold answer from training.tasks, and its PNG encoded once by
lora_router.images.prepare_image, the one image preparation. The router request and the expert request of one
screenshot carry the same image bytes (the one reuse a two-stage request intends), unless the item was made for a
reduced-resolution router.

A phase compared with an earlier one screenshot by screenshot sends its *twins* (twins()): the same screenshots with
one pixel nudged, so they do the same work (the same image tokens; the same answers, lengths included) while no
cache of the server (multimodal inputs, prefix KV) has seen them. Each copy of a screenshot nudges a pixel of its own
(the k-th copy the k-th pixel of the top row), in its reduced-resolution router image too, so every copy is new
beside the original and the other copies.
"""

from __future__ import annotations

import dataclasses
import io
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image

from lora_router.images import PreparedImage, prepare_image
from training.expert_datasets import sample_seed
from training.tasks import build_example

BENCH_SPLIT = "bench"


@dataclass(frozen=True)
class BenchItem:
    """One screenshot and its task, ready to send."""

    index: int  # unique in the run; the screen seed derives from it
    kind: str  # ground-truth class: the expert that should handle it
    seed: int
    prompt: str
    max_tokens: int
    image: PreparedImage  # sent to experts
    router_image: PreparedImage  # sent to the router: `image`, or a reduced copy
    image_tokens: int
    router_image_tokens: int
    copy: int = 0  # 0: the original; k: its k-th twin, whose images carry the k-th nudged pixel


class ScreenPool:
    """Hands out screenshots the server has not seen; deterministic for a seed.

    `answer_tokens(text)` counts a gold answer's tokens (for max_tokens when `expert_max_tokens` is None);
    `image_tokens(width, height)` is the processor's image token count for a picture of that size.
    """

    def __init__(self, seed: int, class_mix: dict[str, float], *, image_max_pixels: int | None,
                 router_max_pixels: int, expert_max_tokens: int | None, answer_tokens: Callable[[str], int],
                 image_tokens: Callable[[int, int], int]) -> None:
        self.seed = seed
        self.kinds = [k for k, w in class_mix.items() if w > 0]
        self.weights = [class_mix[k] for k in self.kinds]
        self.image_max_pixels = image_max_pixels
        self.router_max_pixels = router_max_pixels
        self.expert_max_tokens = expert_max_tokens
        self.answer_tokens = answer_tokens
        self.image_tokens = image_tokens
        self._next = 0
        self._copies: dict[int, int] = {}  # item index -> twins made of it

    def take(self, n: int, kind: str | None = None) -> list[BenchItem]:
        """`n` new screenshots, of class `kind` or drawn from the class mix."""
        draw = random.Random(f"{self.seed}:class-mix:{n}")
        kinds = [kind] * n if kind else draw.choices(self.kinds, self.weights, k=n)
        items = [self._make(self._next + i, k) for i, k in enumerate(kinds)]
        self._next += n
        return items

    def reduced(self, items: Sequence[BenchItem]) -> list[BenchItem]:
        """The same screenshots with router images downscaled to router_max_pixels (new bytes for the server)."""
        out = []
        for item in items:
            small = prepare_image(build_example(item.kind, item.seed).image, max_pixels=self.router_max_pixels)
            small = _nudged(small, item.copy) if item.copy else small
            out.append(dataclasses.replace(item, router_image=small,
                                           router_image_tokens=self.image_tokens(small.width, small.height)))
        return out

    def twins(self, items: Sequence[BenchItem]) -> list[BenchItem]:
        """The same screenshots, new to the server and to every earlier copy (see _nudged)."""
        out = []
        for item in items:
            copy = self._copies[item.index] = self._copies.get(item.index, 0) + 1
            image = prepare_image(build_example(item.kind, item.seed).image, max_pixels=self.image_max_pixels)
            twin = _nudged(image, copy)
            out.append(dataclasses.replace(item, image=twin, router_image=twin, router_image_tokens=item.image_tokens,
                                           copy=copy))
        return out

    def _make(self, index: int, kind: str) -> BenchItem:
        seed = sample_seed(self.seed, BENCH_SPLIT, index)
        example = build_example(kind, seed)
        image = prepare_image(example.image, max_pixels=self.image_max_pixels)
        tokens = self.image_tokens(image.width, image.height)
        max_tokens = self.expert_max_tokens or self.answer_tokens(example.answer) + 1
        return BenchItem(index=index, kind=kind, seed=seed, prompt=example.prompt, max_tokens=max_tokens,
                         image=image, router_image=image, image_tokens=tokens, router_image_tokens=tokens)


def _nudged(prepared: PreparedImage, copy: int) -> PreparedImage:
    """The picture as sent with the red value of pixel `copy` - 1 of its top row flipped in its lowest bit: the PNG
    bytes (vLLM's multimodal cache key, and through it the prefix cache's) differ, the size and the picture do not."""
    image = Image.open(io.BytesIO(prepared.png)).convert("RGB")
    at = ((copy - 1) % image.width, (copy - 1) // image.width)
    red, green, blue = image.getpixel(at)
    image.putpixel(at, (red ^ 1, green, blue))
    return prepare_image(image)
