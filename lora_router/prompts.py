"""The router's prompts: one place, so training data, serving checks and the client render them identically."""

from __future__ import annotations

from collections.abc import Sequence

ROUTER_USER_PROMPT = "Which adapter should handle this screenshot?"


def router_system_prompt(labels: Sequence[str]) -> str:
    """System turn of a routing example; names every adapter the router may answer with (the seed's wording)."""
    if not labels:
        raise ValueError("router_system_prompt needs at least one adapter label")
    names = list(labels)
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])}, or {names[-1]}"
    return (
        "You are a routing classifier for a multi-adapter system. "
        "Given a screenshot, identify which LoRA adapter should handle it. "
        f"Respond with only the adapter name: {listed}."
    )
