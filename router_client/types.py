"""Typed results of the client: a routing decision, an expert's answer, a whole process() call, and counters.

RouteDecision and its literals live with the routing arithmetic in lora_router.routing (the gateway returns them
too); they are re-exported here.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lora_router.routing import FallbackReason, RouteDecision, RouterMode

__all__ = ["APIResponse", "ClientStats", "ExpertResult", "FallbackReason", "ProcessResult", "RouteDecision",
           "RouterMode", "StageTimings", "ToolCall"]

# A tool call may come bare, in Qwen's <tool_call> tags or in a code fence.
_WRAPPERS = (re.compile(r"^<tool_call>(.*)</tool_call>$", re.S), re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S))


@dataclass(frozen=True)
class ToolCall:
    """A JSON tool call answered by an expert: {"name": ..., "arguments": {...}}."""

    name: str
    arguments: dict[str, Any]

    @classmethod
    def parse(cls, text: str) -> ToolCall | None:
        """The tool call when the whole answer is one (bare, in <tool_call> tags or a code fence), else None.

        Arguments given as a JSON-encoded string (as OpenAI-style APIs return them) are decoded.
        """
        text = text.strip()
        for wrapper in _WRAPPERS:
            match = wrapper.match(text)
            if match:
                text = match.group(1).strip()
        try:
            value = json.loads(text)
            if isinstance(value, dict) and isinstance(value.get("arguments"), str):
                value["arguments"] = json.loads(value["arguments"])
        except (ValueError, RecursionError):
            return None
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return None
        if not isinstance(value.get("arguments"), dict):
            return None
        return cls(name=value["name"], arguments=value["arguments"])


@dataclass(frozen=True)
class ExpertResult:
    """An expert's (or the base model's) answer to a task on a screenshot."""

    expert: str
    text: str
    tool_call: ToolCall | None
    prompt_tokens: int
    completion_tokens: int
    latency_s: float


@dataclass(frozen=True)
class StageTimings:
    """Seconds spent per stage of process(): image preparation, routing, the expert, and all of it."""

    image_s: float
    route_s: float
    expert_s: float
    total_s: float


@dataclass(frozen=True)
class ProcessResult:
    """A routed screenshot: the decision, the handling expert's result, and the stage timings."""

    decision: RouteDecision
    result: ExpertResult
    timings: StageTimings

    def describe(self) -> str:
        """The route, its confidence, the expert's answer and the timings, as lines a person reads."""
        decision, call = self.decision, self.result.tool_call
        fallback = f" (fallback: {decision.fallback_reason}; router said {decision.raw!r})" if decision.fallback_reason else ""
        lines = [f"route:      {decision.expert}{fallback}",
                 f"confidence: {decision.confidence:.4f} ({decision.mode})",
                 f"answer:     {self.result.text}"]
        if call is not None:
            lines.append(f"tool call:  {json.dumps({'name': call.name, 'arguments': call.arguments})}")
        lines.append(f"timings:    route {self.timings.route_s:.3f} s, expert {self.timings.expert_s:.3f} s, "
                     f"total {self.timings.total_s:.3f} s")
        return "\n".join(lines)


@dataclass(frozen=True)
class APIResponse:
    """A 2xx JSON answer as the server sent it: its status, headers (case-insensitive) and body."""

    status_code: int
    headers: Mapping[str, str]
    body: dict[str, Any]

    @property
    def request_id(self) -> str | None:
        """The server's x-request-id header, if it sent one."""
        return self.headers.get("x-request-id")


@dataclass
class ClientStats:
    """Counters of one RouterClient since it was made."""

    requests: int = 0
    """HTTP attempts sent (retries and /tokenize included)."""
    routes: int = 0
    """Router answers received."""
    retries: int = 0
    """Attempts repeated after a connection error, timeout, 429 or 5xx."""
    fallbacks: Counter[str] = field(default_factory=Counter)
    """Routes sent to the fallback target, by reason ('unknown_label', 'low_confidence')."""
    errors: Counter[str] = field(default_factory=Counter)
    """Errors raised by route / run_expert / process, by exception class name."""
