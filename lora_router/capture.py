"""The capture store: `auto` screenshots the gateway kept, with their route decision, caller feedback and labels,
for review and for training the next router (issue 25). Screenshots can hold personal data: the store is opt-in
(gateway.capture.dir), bounded (items, age, disk; oldest dropped first) and owner-only (folders 0700, files 0600).

On disk, one folder that the replicas of a fleet may share:

    images/<id>.png    the screenshot exactly as the router saw it
    index.jsonl        one event a line: {"op": "add", item...}, {"op": "set", "id", fields...}, {"op": "delete", "id"}
    index.jsonl.lock   the lock every writer holds (flock) while appending or compacting

Images are written whole before their line is appended (a temporary file renamed), so a reader never meets a line
whose image is half there; pruning rewrites the index compacted (a temporary file renamed over it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Why an item was captured (an item may have several): an unbiased random sample, a route below the confidence
# threshold, a candidate router that routed it otherwise, the caller's x-capture header, the caller's feedback.
REASONS = ("random", "low_confidence", "disagreement", "flagged", "feedback")
# The share of captures held out of training (training.captures export's default); the shadow report scores routers
# on the labelled ones among them.
HELD_OUT_FRACTION = 0.25
_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_INDEX = "index.jsonl"
_IMAGES = "images"


class CaptureError(Exception):
    """A capture request the store cannot carry out (unknown id, a bad field); the message says which."""


@dataclass
class CaptureItem:
    """One captured screenshot and what is known of it."""

    id: str = field(metadata={"help": "The request id (x-request-id) of the auto request."})
    captured_at: float = field(metadata={"help": "When it was captured, epoch seconds."})
    router: str | None = field(metadata={"help": "The router version that routed it (its versioned name)."})
    expert: str = field(metadata={"help": "Where it was sent: the routed expert, or the fallback target."})
    confidence: float = field(metadata={"help": "The router's confidence in its label."})
    probabilities: dict[str, float] = field(metadata={"help": "The router's probability per label."})
    fallback: str | None = field(metadata={"help": "Why the fallback was taken, None when the route stood."})
    reasons: list[str] = field(metadata={"help": "Why it was captured (REASONS)."})
    size: int = field(metadata={"help": "Bytes of the PNG on disk."})
    feedback: dict[str, Any] | None = field(default=None, metadata={
        "help": "The caller's feedback: {correct, expert (the right one, when it said), time}."})
    label: str | None = field(default=None, metadata={
        "help": "The right expert, as a reviewer (or feedback naming it) set it; None: unlabeled."})

    @property
    def image(self) -> str:
        """The image's path inside the store."""
        return f"{_IMAGES}/{self.id}.png"


class CaptureStore:
    """A capture folder with its bounds: at most `max_items` items, none older than `max_age_s`, at most
    `max_bytes` of images; every add drops what is over, oldest first."""

    def __init__(self, folder: Path, max_items: int, max_age_s: float, max_bytes: int) -> None:
        self.folder = Path(folder)
        self.max_items, self.max_age_s, self.max_bytes = max_items, max_age_s, max_bytes
        for path in (self.folder, self.folder / _IMAGES):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.chmod(0o700)  # mkdir's mode is masked by the umask, and an existing folder keeps its own
        self.index = self.folder / _INDEX

    def add(self, item: CaptureItem, png: bytes) -> list[str]:
        """Store `item` with its screenshot (an id stored already gains the new reasons, feedback and label), then
        drop what is over the bounds; the ids dropped (the new one too, when it alone is over them)."""
        _check_id(item.id)
        self._write_private(self.folder / item.image, png)
        with self._locked():
            stored = self._fold().get(item.id)
            if stored is None:
                self._append({"op": "add", **dataclasses.asdict(item)})
            else:  # captured twice (sampled, then a shadow disagreement): one item, every reason
                self._append({"op": "set", "id": item.id, "reasons": merge_reasons(stored.reasons, item.reasons),
                              "feedback": item.feedback or stored.feedback, "label": item.label or stored.label})
            return self._prune(time.time())

    def update(self, item_id: str, **fields: Any) -> CaptureItem:
        """Set `fields` (feedback, label, reasons) of a stored item; CaptureError for an id not stored."""
        unknown = set(fields) - {"feedback", "label", "reasons"}
        if unknown:
            raise CaptureError(f"not a field to change: {', '.join(sorted(unknown))}")
        with self._locked():
            items = self._fold()
            if item_id not in items:
                raise CaptureError(f"no captured item {item_id!r}")
            self._append({"op": "set", "id": item_id, **fields})
            return dataclasses.replace(items[item_id], **fields)

    def delete(self, item_id: str) -> None:
        """Delete an item and its screenshot; CaptureError for an id not stored."""
        with self._locked():
            if item_id not in self._fold():
                raise CaptureError(f"no captured item {item_id!r}")
            self._append({"op": "delete", "id": item_id})
            (self.folder / _IMAGES / f"{item_id}.png").unlink(missing_ok=True)

    def get(self, item_id: str) -> CaptureItem | None:
        return self.items().get(item_id)

    def items(self) -> dict[str, CaptureItem]:
        """Every stored item by id, oldest first."""
        with self._locked():
            return self._fold()

    def png(self, item: CaptureItem) -> bytes:
        return (self.folder / item.image).read_bytes()

    def prune(self, now: float | None = None) -> list[str]:
        """Drop what is over the bounds now (an add does it too); the ids dropped."""
        with self._locked():
            return self._prune(time.time() if now is None else now)

    # -- under the lock

    def _fold(self) -> dict[str, CaptureItem]:
        items: dict[str, CaptureItem] = {}
        try:
            lines = self.index.read_text().splitlines()
        except FileNotFoundError:
            return items
        for line in lines:
            event = json.loads(line)
            op, item_id = event.pop("op"), event["id"]
            if op == "add":
                items[item_id] = CaptureItem(**event)
            elif op == "set" and item_id in items:
                event.pop("id")
                items[item_id] = dataclasses.replace(items[item_id], **event)
            elif op == "delete":
                items.pop(item_id, None)
        return items

    def _prune(self, now: float) -> list[str]:
        items = sorted(self._fold().values(), key=lambda i: i.captured_at)
        kept = [i for i in items if now - i.captured_at <= self.max_age_s][-self.max_items:]
        while kept and sum(i.size for i in kept) > self.max_bytes:
            kept.pop(0)
        kept_ids = {i.id for i in kept}
        dropped = [i.id for i in items if i.id not in kept_ids]
        if dropped or len(kept) < self._lines():
            self._write_private(self.index, "".join(_line({"op": "add", **dataclasses.asdict(i)}) for i in kept)
                                .encode())
        for item_id in dropped:
            (self.folder / _IMAGES / f"{item_id}.png").unlink(missing_ok=True)
        return dropped

    def _lines(self) -> int:
        try:
            with self.index.open("rb") as f:
                return sum(1 for _ in f)
        except FileNotFoundError:
            return 0

    def _append(self, event: dict[str, Any]) -> None:
        fd = os.open(self.index, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "ab") as f:
            f.write(_line(event).encode())

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.folder / f"{_INDEX}.lock", os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "wb") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write_private(self, path: Path, data: bytes) -> None:
        """Write a file owner-only and whole: a temporary file renamed over `path`."""
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(data)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)


def held_out(item_id: str, fraction: float = HELD_OUT_FRACTION) -> bool:
    """Whether a capture is in the held-out split: by a hash of its id, so adding captures moves none."""
    return int(hashlib.sha256(item_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def merge_reasons(first: list[str], more: list[str]) -> list[str]:
    """`first`, then the reasons of `more` it lacks."""
    return first + [r for r in more if r not in first]


def _line(event: dict[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":")) + "\n"


def _check_id(item_id: str) -> None:
    """An id is a file name in the store: a plain token, never a path."""
    if not _ID_RE.match(item_id) or item_id in (".", ".."):
        raise CaptureError(f"not a capture id: {item_id!r}")
