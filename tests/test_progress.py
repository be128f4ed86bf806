"""lora_router.progress: off a terminal, progress is a log line every few seconds, never a redrawn bar."""

from __future__ import annotations

import logging

from lora_router import progress as progress_module
from lora_router.progress import progress


def test_off_a_terminal_progress_is_logged_with_rate_and_total(caplog, capsys, monkeypatch):
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.0)  # a line on every update
    with caplog.at_level(logging.INFO, logger="progress"):
        with progress(total=3, desc="batch", unit="img") as bar:
            for _ in range(3):
                bar.update(1)
    lines = [r.getMessage() for r in caplog.records if r.name == "progress"]
    assert lines and lines[-1].startswith("batch: 3/3 (") and "img/s" in lines[-1]
    assert "\r" not in capsys.readouterr().err  # no bar drawn


def test_disabled_progress_says_nothing(caplog):
    with caplog.at_level(logging.INFO, logger="progress"):
        assert list(progress(range(3), desc="quiet", disable=True)) == [0, 1, 2]
    assert not caplog.records
