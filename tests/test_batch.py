"""The batch runner against the scripted fake vLLM: folder and JSONL input, per-item errors, resuming, and
the command line's exit status."""

from __future__ import annotations

import asyncio
import io
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from router_client import _constants
from router_client.batch import BatchInputError, BatchItem, load_items, main, read_output, run_batch
from router_client.config import ClientConfig
from tests.fake_vllm import LABELS, FakeVLLM, Fault, fake_vllm  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(20)

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"
COLORS = {(255, 0, 0): "calendar", (0, 255, 0): "claim-window", (0, 0, 255): "provider-select"}


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(_constants, "INITIAL_RETRY_DELAY_S", 0.01)
    monkeypatch.setattr(_constants, "MAX_RETRY_DELAY_S", 0.02)


@pytest.fixture
def fake(fake_vllm: FakeVLLM) -> FakeVLLM:
    """The fake server routing each screenshot by its colour."""
    fake_vllm.route = lambda png: COLORS[Image.open(io.BytesIO(png)).convert("RGB").getpixel((0, 0))]
    return fake_vllm


def config(fake: FakeVLLM, **overrides) -> ClientConfig:
    values = dict(base_url=fake.base_url, router_name="router", labels=list(LABELS),
                  expert_prompts={label: f"Do the {label} task." for label in LABELS}, max_retries=0)
    return ClientConfig(**{**values, **overrides})


def write_screens(folder: Path, count: int) -> list[str]:
    """`count` screenshots cycling through the colours, some in a subfolder; returns their relative paths."""
    names = []
    for i in range(count):
        name = f"sub/screen-{i:02d}.png" if i % 3 == 0 else f"screen-{i:02d}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), list(COLORS)[i % 3]).save(folder / name)
        names.append(name)
    return names


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_each_id_ok_once(path: Path, ids: list[str]) -> None:
    ok = Counter(r["custom_id"] for r in lines(path) if r["status"] == "ok")
    assert ok == Counter(ids)


async def test_folder_input(fake, tmp_path):
    names = write_screens(tmp_path / "in", 6)
    (tmp_path / "in" / "notes.txt").write_text("not an input")
    items = load_items(tmp_path / "in")
    assert [item.custom_id for item in items] == sorted(names)
    out = tmp_path / "results.jsonl"
    summary = await run_batch(config(fake), items, out, concurrency=4, progress=False)
    assert (summary.total, summary.ok, summary.failed, summary.skipped) == (6, 6, 0, 0)
    assert summary.by_expert == Counter({label: 2 for label in LABELS})
    records = {r["custom_id"]: r for r in lines(out)}
    assert set(records) == set(names)
    first = records["sub/screen-00.png"]
    assert first["status"] == "ok" and first["expert"] == "calendar" and first["confidence"] > 0.5
    assert first["tool_call"] == {"name": "click", "arguments": {"x": 10, "y": 20}}
    assert set(first["timings"]) == {"image_s", "route_s", "expert_s", "total_s"}
    assert summary.latency.p50 is not None and "latency p99" in summary.table()


async def test_jsonl_input_with_prompts_relative_paths_and_default_ids(fake, tmp_path):
    write_screens(tmp_path / "imgs", 2)
    spec = tmp_path / "batch.jsonl"
    spec.write_text(json.dumps({"custom_id": "a", "image": "imgs/screen-01.png", "prompt": "Click on Ann."}) + "\n\n"
                    + json.dumps({"image": "imgs/sub/screen-00.png"}) + "\n")
    items = load_items(spec)
    assert items == [BatchItem("a", tmp_path / "imgs/screen-01.png", "Click on Ann."),
                     BatchItem("imgs/sub/screen-00.png", tmp_path / "imgs/sub/screen-00.png")]
    out = tmp_path / "results.jsonl"
    summary = await run_batch(config(fake), items, out, progress=False)
    assert summary.ok == 2
    prompts = {r.body["model"]: r.body["messages"][-1]["content"][1]["text"]
               for r in fake.chat_requests() if r.body["model"] != "router"}
    assert prompts == {"claim-window": "Click on Ann.", "calendar": "Do the calendar task."}


@pytest.mark.parametrize("content, message", [
    ('{"image": "x.png", "promt": "typo"}\n', "unknown key(s) promt"),
    ('{"custom_id": "a"}\n', 'expected an object with an "image" path'),
    ("not json\n", "batch.jsonl:1: malformed JSON"),
    ('{"custom_id": "a", "image": "x.png"}\n{"custom_id": "a", "image": "y.png"}\n', "custom_id repeated: a"),
])
def test_bad_jsonl_input_is_refused(tmp_path, content, message):
    spec = tmp_path / "batch.jsonl"
    spec.write_text(content)
    with pytest.raises(BatchInputError, match=re.escape(message)):
        load_items(spec)


async def test_bad_images_are_error_lines_and_do_not_stop_the_batch(fake, tmp_path):
    names = write_screens(tmp_path / "in", 3)
    (tmp_path / "in" / "empty.png").write_bytes(b"")
    (tmp_path / "in" / "text.png").write_text("hello")
    out = tmp_path / "results.jsonl"
    summary = await run_batch(config(fake), load_items(tmp_path / "in"), out, concurrency=2, progress=False)
    assert (summary.ok, summary.failed) == (3, 2) and summary.by_error == {"InvalidImageError": 2}
    records = {r["custom_id"]: r for r in lines(out)}
    assert records["empty.png"]["status"] == "error"
    assert records["empty.png"]["error"]["type"] == "InvalidImageError"
    assert "empty file" in records["empty.png"]["error"]["message"]
    assert "not an image" in records["text.png"]["error"]["message"]
    assert_each_id_ok_once(out, names)


async def test_resume_skips_finished_ids_retries_errors_and_repairs_a_torn_line(fake, tmp_path):
    names = write_screens(tmp_path / "in", 4)
    out = tmp_path / "results.jsonl"
    done = {"custom_id": names[0], "status": "ok", "expert": "calendar", "confidence": 1.0, "answer": "x",
            "tool_call": None, "timings": {}}
    failed = {"custom_id": names[1], "status": "error", "error": {"type": "APIConnectionError", "message": "x"}}
    out.write_text(json.dumps(done) + "\n" + json.dumps(failed) + "\n" + '{"custom_id": "' + names[2][:5])
    summary = await run_batch(config(fake), load_items(tmp_path / "in"), out, progress=False)
    assert (summary.skipped, summary.ok, summary.failed) == (1, 3, 0)
    assert len(fake.chat_requests("router")) == 3
    records = lines(out)  # every line parses: the torn one is gone
    assert records[:2] == [done, failed]
    assert_each_id_ok_once(out, names)
    latest = {cid: entries[-1]["status"] for cid, entries in read_output(out).items()}
    assert latest == dict.fromkeys(names, "ok")


async def test_rerun_completes_items_the_server_failed(fake, tmp_path):
    names = write_screens(tmp_path / "in", 8)
    items = load_items(tmp_path / "in")
    out = tmp_path / "results.jsonl"
    fake.faults.extend([Fault(status=500)] * 3)
    first = await run_batch(config(fake), items, out, concurrency=3, progress=False)
    assert (first.ok, first.failed) == (5, 3) and first.by_error == {"InternalServerError": 3}
    second = await run_batch(config(fake), items, out, concurrency=3, progress=False)
    assert (second.skipped, second.ok, second.failed) == (5, 3, 0)
    assert_each_id_ok_once(out, names)


async def test_dead_server_items_fail_with_connection_errors_and_a_rerun_completes_them(fake, tmp_path):
    names = write_screens(tmp_path / "in", 3)
    items = load_items(tmp_path / "in")
    out = tmp_path / "results.jsonl"
    dead = config(fake, base_url="http://127.0.0.1:9/v1", router_mode="choice", max_retries=1)
    summary = await run_batch(dead, items, out, progress=False)
    assert summary.failed == 3 and summary.by_error == {"APIConnectionError": 3}
    await run_batch(config(fake), items, out, progress=False)
    assert_each_id_ok_once(out, names)


async def test_command_line_exit_status(fake, tmp_path):
    write_screens(tmp_path / "in", 2)
    out = tmp_path / "results.jsonl"
    common = ["--config", str(TINY_CONFIG), "--output", str(out), "--base-url", fake.base_url, "--no-progress"]
    argv = common + ["--input", str(tmp_path / "in")]
    # main() runs its own event loop, so it runs in a thread while this loop serves the fake.
    assert await asyncio.to_thread(main, argv) == 0
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n")
    assert await asyncio.to_thread(main, argv) == 1
    assert [r["custom_id"] for r in lines(out)][-1] == "broken.png"
    assert await asyncio.to_thread(main, common + ["--input", str(tmp_path / "missing")]) == 2
