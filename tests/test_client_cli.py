"""The client command lines as a new user meets them: local inputs checked before any request, and one error
line that says what was tried and what to do. No server needed."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
from PIL import Image

import router_client.__main__ as one_shot
from router_client import batch

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"


@pytest.fixture
def closed_url() -> str:
    """An API root on 127.0.0.1 where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture
def screenshot(tmp_path) -> Path:
    path = tmp_path / "screen.png"
    Image.new("RGB", (40, 30), (255, 0, 0)).save(path)
    return path


def test_a_file_that_is_no_image_is_refused_before_any_request(tmp_path, capsys, monkeypatch):
    notes = tmp_path / "notes.png"
    notes.write_text("meeting notes, not a screenshot")

    def no_network(*args, **kwargs):
        raise AssertionError("the client was started for a file that is no image")

    monkeypatch.setattr(one_shot, "RouterClient", no_network)
    assert one_shot.main(["--config", str(TINY_CONFIG), str(notes)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert f"{notes}: not an image" in err


def test_no_server_is_said_once_with_the_url_and_how_to_start_one(screenshot, closed_url, capsys):
    assert one_shot.main(["--config", str(TINY_CONFIG), "--base-url", closed_url, "--max-retries", "0",
                          str(screenshot)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert err.count(closed_url.removesuffix("/v1")) == 1 and "connection refused" in err
    assert f"python -m serving --config {TINY_CONFIG}" in err


def test_batch_says_the_same_when_no_server_answers(screenshot, closed_url, tmp_path, capsys):
    argv = ["--config", str(TINY_CONFIG), "--set", "client.max_retries=0", "--base-url", closed_url,
            "--input", str(screenshot.parent), "--output", str(tmp_path / "out" / "results.jsonl")]
    assert batch.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and closed_url in err and "connection refused" in err
    assert f"python -m serving --config {TINY_CONFIG} --set client.max_retries=0" in err


def test_both_commands_share_their_client_flags(capsys):
    for main in (one_shot.main, batch.main):
        with pytest.raises(SystemExit):
            main(["--help"])
        text = capsys.readouterr().out
        for flag in ("--config", "--set", "--base-url", "--mode", "--api-key", "--timeout-s", "--max-retries"):
            assert flag in text, (main.__module__, flag)


@pytest.mark.parametrize(("expert", "answer", "expected"), [
    ("calendar", '{"name":"click","arguments":{"x":398,"y":317}}', r"right for this screenshot .*in_box 1\.00"),
    ("calendar", '{"name":"click","arguments":{"x":10,"y":10}}', r"not right for this screenshot .*in_box 0\.00"),
    ("calendar", "no idea", r"not right .*valid_json 0\.00"),
    ("provider-select", '{"name":"click","arguments":{"x":398,"y":317}}', r"wrong route \(provider-select, the "
                                                                           r"screenshot is a calendar screen\)"),
])
def test_the_main_jobs_verdict_on_its_one_screenshot(expert: str, answer: str, expected: str) -> None:
    from benchmarks.quickstart import verdict

    gold = '{"name":"click","arguments":{"x":398,"y":317}}'
    sample = {"conversations": [{"from": "human", "value": "<image>\nClick the highlighted day."},
                                {"from": "gpt", "value": gold}],
              "metadata": {"task_type": "calendar", "target": {"action": "click", "box": [377, 296, 421, 340],
                                                               "task": "highlighted-day"}}}
    assert re.search(expected, verdict(sample, expert, answer))
    assert verdict({**sample, "metadata": {}}, expert, answer).startswith("verdict:    none (the sample has no")
