"""Capture and caller feedback in the gateway: which `auto` requests go to the capture store (lora_router.capture),
the last requests remembered so that feedback can capture one after the fact, and the feedback itself.

Writing the store happens off the event loop and off the caller's path: a capture that fails is logged and counted,
the caller's answer never waits for it.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_router.capture import CaptureError, CaptureItem, CaptureStore, held_out, merge_reasons
from lora_router.deployment import CaptureConfig
from lora_router.images import PreparedImage
from lora_router.routing import RouteDecision
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.protocol import Feedback, GatewayError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Recent:
    """An auto request as it was routed: its screenshot's PNG (None while capture is off) and decision."""

    png: bytes | None
    decision: RouteDecision


class Capturer:
    """The capture policy and feedback of one gateway; `store` is None while capture is off (gateway.capture.dir
    unset), when only the routes are remembered, for counting feedback."""

    def __init__(self, settings: CaptureConfig, folder: Path | None, metrics: GatewayMetrics,
                 metric_label: Callable[[str], str], rng: random.Random | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.metric_label = metric_label
        self.store = None if folder is None else CaptureStore(
            folder, max_items=settings.max_items, max_age_s=settings.max_age_days * 86400,
            max_bytes=int(settings.max_mb * 1024 * 1024))
        self._rng = rng or random.Random()
        self._recent: OrderedDict[str, _Recent] = OrderedDict()
        self._tasks: set[asyncio.Task] = set()

    def observe(self, request_id: str, image: PreparedImage, decision: RouteDecision, flagged: bool) -> None:
        """Remember a routed auto request, and capture it if the policy says so."""
        png = None if self.store is None else image.png
        self._recent[request_id] = _Recent(png, decision)
        while len(self._recent) > self.settings.recent:
            self._recent.popitem(last=False)
        if self.store is None:
            return
        reasons = []
        if self.settings.fraction and self._rng.random() < self.settings.fraction:
            reasons.append("random")
        if decision.confidence < self.settings.below_confidence:
            reasons.append("low_confidence")
        if flagged and self.settings.flagged:
            reasons.append("flagged")
        if reasons:
            self._spawn(request_id, reasons)

    def disagreement(self, request_id: str) -> None:
        """A shadowed candidate router routed this request otherwise than the live one."""
        if self.store is not None and self.settings.disagreements:
            self._spawn(request_id, ["disagreement"])

    async def feedback(self, feedback: Feedback) -> dict[str, Any]:
        """Count the caller's verdict on a route and, with capture on, store it with the screenshot (which captures
        a request not captured yet); a 404 for a request neither remembered nor stored."""
        recent = self._recent.get(feedback.request_id)
        stored = None if self.store is None else await asyncio.to_thread(self.store.get, feedback.request_id)
        if recent is None and stored is None:
            raise GatewayError(404, f"no auto request {feedback.request_id!r} to give feedback on: this replica "
                                    f"remembers its last {self.settings.recent} (gateway.capture.recent) and the "
                                    "capture store has no such item", param="request_id", code="unknown_request")
        routed = recent.decision.expert if recent else stored.expert
        router = recent.decision.router if recent else stored.router
        self.metrics.feedback.labels(self.metric_label(routed), "correct" if feedback.correct else "wrong").inc()
        label = routed if feedback.correct else feedback.expert
        answer = {"request_id": feedback.request_id, "router": router, "routed": routed, "correct": feedback.correct,
                  "label": label, "captured": self.store is not None}
        if self.store is None:
            return answer
        given = {"correct": feedback.correct, "expert": feedback.expert, "at": time.time()}
        if stored is None:
            item = _item(feedback.request_id, recent.decision, recent.png, ["feedback"], given, label)
            await self._write(item, recent.png)
        else:
            await asyncio.to_thread(self.store.update, feedback.request_id, feedback=given,
                                    label=label or stored.label, reasons=merge_reasons(stored.reasons, ["feedback"]))
        return answer

    def labelled_held_out(self) -> list[tuple[str, str]]:
        """The labelled captures of the held-out split (none of them in an exported training set), as (image data
        URL, label), oldest first; blocking, so run it in a thread."""
        store = self.require_store()
        out = []
        for item in store.items().values():
            if item.label is None or not held_out(item.id):
                continue
            try:
                png = store.png(item)
            except FileNotFoundError:  # pruned or deleted since the index was read
                continue
            out.append(("data:image/png;base64," + base64.b64encode(png).decode(), item.label))
        return out

    def require_store(self) -> CaptureStore:
        """The store; the capture routes' 404 while capture is off."""
        if self.store is None:
            raise GatewayError(404, "capture is off: set gateway.capture.dir to keep screenshots", code="capture_off")
        return self.store

    async def png(self, item_id: str) -> bytes:
        """A captured screenshot; 404 for an item that is not there."""
        store = self.require_store()
        item = await asyncio.to_thread(store.get, item_id)
        if item is None:
            raise GatewayError(404, f"no captured item {item_id!r}", code="not_found")
        return await asyncio.to_thread(store.png, item)

    async def close(self) -> None:
        """Wait for the captures being written."""
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, request_id: str, reasons: list[str]) -> None:
        recent = self._recent.get(request_id)
        if recent is None:  # forgotten already (a shadow answer that came after `recent` newer requests)
            return
        item = _item(request_id, recent.decision, recent.png, reasons)
        task = asyncio.get_running_loop().create_task(self._write(item, recent.png))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, item: CaptureItem, png: bytes) -> None:
        try:
            dropped = await asyncio.to_thread(self.store.add, item, png)
        except (OSError, CaptureError) as exc:
            self.metrics.capture_failures.inc()
            log.warning("capturing request %s failed: %s", item.id, exc)
            return
        for reason in item.reasons:
            self.metrics.captures.labels(reason).inc()
        self.metrics.captures_dropped.inc(len(dropped))


def _item(request_id: str, decision: RouteDecision, png: bytes, reasons: list[str],
          feedback: dict[str, Any] | None = None, label: str | None = None) -> CaptureItem:
    return CaptureItem(id=request_id, captured_at=time.time(), router=decision.router, expert=decision.expert,
                       confidence=decision.confidence, probabilities=decision.probabilities,
                       fallback=decision.fallback_reason, reasons=reasons, size=len(png), feedback=feedback,
                       label=label)
