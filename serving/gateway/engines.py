"""Which data-parallel engine of a replica gets a chat request: the one with the fewest of the gateway's requests in
flight, idle ties taken in turn, by global rank (the engines of every node of the replica). Both stages of a
screenshot (router, then expert) go to it, so the expert's engine reuses the router's image encoding; vLLM reads the
choice from the X-data-parallel-rank header."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class EnginePicker:
    """Counts the gateway's requests in flight per engine; `pinned()` holds one engine for a whole request."""

    def __init__(self, engines: int) -> None:
        self.in_flight = [0] * engines
        self._next = 0  # where the search for a least-loaded engine starts, so ties rotate

    @contextlib.contextmanager
    def pinned(self) -> Iterator[int | None]:
        """The least-loaded engine's rank for the duration of the block; None with one engine (no header needed)."""
        engines = len(self.in_flight)
        if engines == 1:
            yield None
            return
        least = min(self.in_flight)
        rank = next(r for r in ((self._next + i) % engines for i in range(engines)) if self.in_flight[r] == least)
        self._next = (rank + 1) % engines
        self.in_flight[rank] += 1
        try:
            yield rank
        finally:
            self.in_flight[rank] -= 1
