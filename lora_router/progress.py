"""Progress of long work: a tqdm bar on a terminal, a log line every few seconds otherwise.

    with progress(total=len(items), desc="train", unit="step") as bar:
        for item in items:
            ...
            bar.update(1)

A bar redrawn into a log file is megabytes of carriage returns; a line with rate and ETA every
LOG_EVERY_S seconds says the same thing in a few hundred bytes.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from tqdm import tqdm

LOG_EVERY_S = 5.0
log = logging.getLogger("progress")


class _LogBar(tqdm):
    """tqdm that draws nothing and logs `desc: n/total (rate, ETA) postfix` every LOG_EVERY_S seconds."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = False
        kwargs["file"] = _Discard()
        kwargs["mininterval"] = LOG_EVERY_S
        super().__init__(*args, **kwargs)
        self._last_log = time.monotonic()

    def update(self, n: float = 1) -> bool | None:
        shown = super().update(n)
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            self._log_line()
        return shown

    def close(self) -> None:
        if not self.disable and self.n and time.monotonic() > self._last_log:
            self._log_line()  # the final count, also for bars that ended between two log lines
        super().close()

    def _log_line(self) -> None:
        d = self.format_dict
        rate = d["n"] / d["elapsed"] if d["elapsed"] else 0.0
        eta = (d["total"] - d["n"]) / rate if rate and d["total"] else None
        total = f"/{d['total']:.0f}" if d["total"] else ""
        log.info("%s: %d%s (%.2f %s/s%s)%s", d["prefix"] or "progress", d["n"], total, rate, d["unit"],
                 f", ETA {tqdm.format_interval(eta)}" if eta is not None else "",
                 f" {d['postfix']}" if d.get("postfix") else "")


class _Discard:
    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


def progress(iterable: Any = None, *, disable: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar when stderr is a terminal, else a logging progress (same interface); `disable` silences both."""
    if disable:
        return tqdm(iterable, disable=True, **kwargs)
    if sys.stderr.isatty():
        return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **kwargs)
    return _LogBar(iterable, **kwargs)
