"""JSON Lines files: one reader that names FILE:LINE on a bad line, one writer, and one appender for files that
grow as work finishes (a crash loses at most the line being written). Every dataset and result file uses these."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path


def iter_jsonl(path: str | Path, error: type[Exception] = ValueError) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; raise `error` naming FILE:LINE on a bad one."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise error(f"{path}:{number}: malformed JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise error(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def read_jsonl(path: str | Path) -> list[dict]:
    """Every object of a JSONL file (ValueError naming FILE:LINE on a bad line)."""
    return [record for _, record in iter_jsonl(path)]


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """One JSON object per line, UTF-8 kept as is."""
    with Path(path).open("w", encoding="utf-8") as f:
        f.writelines(map(_line, records))


@contextlib.contextmanager
def append_jsonl(path: str | Path) -> Iterator[Callable[[dict], None]]:
    """A function that appends one object as a line to `path` and flushes it at once, so the file holds every
    finished record if the process dies; a line cut short by a crash is cut_torn_line's to remove."""
    with Path(path).open("a", encoding="utf-8") as f:
        def append(record: dict) -> None:
            f.write(_line(record))
            f.flush()

        yield append


def cut_torn_line(path: str | Path) -> None:
    """Cut off the last line of `path` if it has no newline: a write a crash cut short."""
    path = Path(path)
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    if complete < len(data):
        with path.open("r+b") as f:
            f.truncate(complete)


def _line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"
