"""The batch runner against the scripted fake vLLM: folder and JSONL input, per-item errors, resuming, the
command line's exit status, routing through the gateway, and the OpenAI Batch format."""

from __future__ import annotations

import asyncio
import base64
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


# Through the gateway, and the OpenAI Batch format.


async def test_via_gateway_is_one_auto_request_per_screenshot_with_the_same_result_lines(fake, tmp_path):
    names = write_screens(tmp_path / "in", 6)
    items = load_items(tmp_path / "in")
    client_side, gateway = tmp_path / "client.jsonl", tmp_path / "gateway.jsonl"
    await run_batch(config(fake, router_mode="choice"), items, client_side, concurrency=3, progress=False)
    sent_before = len(fake.requests)
    summary = await run_batch(config(fake), items, gateway, concurrency=3, progress=False, via_gateway=True)
    assert (summary.ok, summary.failed) == (6, 0) and summary.by_expert == Counter({label: 2 for label in LABELS})
    sent = fake.requests[sent_before:]
    assert [r.body["model"] for r in sent] == ["auto"] * 6  # no router request, no /tokenize
    assert_each_id_ok_once(gateway, names)
    by_client, by_gateway = ({r["custom_id"]: r for r in lines(path)} for path in (client_side, gateway))
    for custom_id, line in by_gateway.items():
        assert set(line) == set(by_client[custom_id])
        assert set(line["timings"]) == {"image_s", "route_s", "expert_s", "total_s"}
        same = ("expert", "fallback_reason", "answer", "tool_call")
        assert {k: line[k] for k in same} == {k: by_client[custom_id][k] for k in same}
        assert line["confidence"] == pytest.approx(by_client[custom_id]["confidence"])


def openai_line(custom_id: str, image_url: str, model: str = "auto", **body) -> str:
    content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": "Do it."}]
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": model, "messages": [{"role": "user", "content": content}], **body}}) + "\n"


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def assert_each_id_200_once(path: Path, ids: list[str]) -> None:
    done = Counter(r["custom_id"] for r in lines(path) if r["response"] and r["response"]["status_code"] == 200)
    assert done == Counter(ids)


async def test_openai_format_sends_bodies_as_they_are_and_writes_openai_output_lines(fake, tmp_path):
    write_screens(tmp_path / "imgs", 3)
    spec = tmp_path / "requests.jsonl"
    spec.write_text(openai_line("by-path", "imgs/screen-01.png", max_tokens=7, seed=3)
                    + openai_line("by-data-url", data_url(tmp_path / "imgs/screen-02.png"))
                    + openai_line("named-expert", "imgs/sub/screen-00.png", model="provider-select"))
    items = load_items(spec)
    out = tmp_path / "results.jsonl"
    summary = await run_batch(config(fake), items, out, concurrency=1, progress=False)
    assert (summary.ok, summary.failed) == (3, 0)
    assert summary.by_expert == Counter({"claim-window": 1, "provider-select": 2})
    by_path, by_data_url, named = fake.chat_requests()
    # Local files are sent as data URLs; everything else in the body exactly as written.
    sent_url = by_path.body["messages"][0]["content"][0]["image_url"]["url"]
    assert sent_url.startswith("data:image/png;base64,") and by_path.body["max_tokens"] == 7
    assert {**by_path.body, "messages": None} == {**items[0].body, "messages": None}
    assert by_data_url.body == items[1].body and named.body["model"] == "provider-select"
    records = {r["custom_id"]: r for r in lines(out)}
    assert set(records["by-path"]) == {"id", "custom_id", "response", "error"}
    assert records["by-path"]["id"].startswith("batch_req_") and records["by-path"]["error"] is None
    response = records["by-path"]["response"]
    assert response["status_code"] == 200 and response["request_id"].startswith("req-")
    assert response["body"]["model"] == "claim-window" == response["body"]["routing"]["expert"]
    assert records["named-expert"]["response"]["body"]["model"] == "provider-select"
    assert "routing" not in records["named-expert"]["response"]["body"]


async def test_openai_format_failures_are_error_lines_and_a_rerun_completes_each_id_exactly_once(fake, tmp_path):
    write_screens(tmp_path / "imgs", 6)
    spec = tmp_path / "requests.jsonl"
    ids = [f"req-{i}" for i in range(6)]
    spec.write_text("".join(openai_line(cid, f"imgs/screen-{i:02d}.png" if i % 3 else f"imgs/sub/screen-{i:02d}.png")
                            for i, cid in enumerate(ids)) + openai_line("missing", "imgs/nope.png"))
    items = load_items(spec)
    out = tmp_path / "results.jsonl"
    fake.faults.extend([Fault(status=503, message="overloaded")] * 2)
    first = await run_batch(config(fake), items, out, concurrency=2, progress=False)
    assert (first.ok, first.failed) == (4, 3)
    assert first.by_error == {"InternalServerError": 2, "InvalidImageError": 1}
    failed = [r for r in lines(out) if r["error"] is not None]
    server_failures = [r for r in failed if r["response"] is not None]
    assert len(server_failures) == 2
    for record in server_failures:
        assert record["response"]["status_code"] == 503 and record["error"]["code"] == "InternalServerError"
        assert record["response"]["body"]["error"]["message"] == "overloaded"
        assert "overloaded" in record["error"]["message"]
    (missing,) = [r for r in failed if r["response"] is None]
    assert missing["custom_id"] == "missing" and missing["error"]["code"] == "InvalidImageError"
    assert "nope.png" in missing["error"]["message"]

    # A crash mid-write leaves a torn line; the rerun cuts it, skips the 200s and redoes the rest.
    with out.open("a") as f:
        f.write('{"id": "batch_req_x", "custom_id": "req-')
    (tmp_path / "imgs" / "nope.png").write_bytes((tmp_path / "imgs" / "screen-01.png").read_bytes())
    before = len(fake.chat_requests())
    second = await run_batch(config(fake), items, out, concurrency=2, progress=False)
    assert (second.skipped, second.ok, second.failed) == (4, 3, 0)
    assert len(fake.chat_requests()) - before == 3
    assert_each_id_200_once(out, [*ids, "missing"])
    third = await run_batch(config(fake), items, out, progress=False)
    assert (third.skipped, third.ok) == (7, 0) and len(fake.chat_requests()) - before == 3


@pytest.mark.parametrize("content, message", [
    ('{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {}}\n',
     "batch.jsonl:1: only \"method\": \"POST\" with \"url\": \"/v1/chat/completions\" is supported"),
    ('{"custom_id": "a", "method": "GET", "url": "/v1/chat/completions", "body": {}}\n', "batch.jsonl:1: only"),
    ('{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "auto"}}\n',
     'batch.jsonl:1: body must be a chat request with a "model" string and a "messages" list'),
    ('{"method": "POST", "url": "/v1/chat/completions", "body": {"model": "auto", "messages": []}}\n',
     "batch.jsonl:1: custom_id must be a string"),
    ('{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}, "image": "x.png"}\n',
     "batch.jsonl:1: unknown key(s) image in an OpenAI Batch line"),
    ('{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", '
     '"body": {"model": "auto", "messages": [], "stream": true}}\n', "batch.jsonl:1: stream is not supported"),
    ('{"custom_id": "a", "image": "x.png"}\n\n{"custom_id": "b", "body": {}}\n',
     "batch.jsonl:3: an OpenAI Batch line in a file of native lines"),
    ('{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", '
     '"body": {"model": "auto", "messages": []}}\n{"custom_id": "b", "image": "x.png"}\n',
     "batch.jsonl:2: a native line in a file of OpenAI Batch lines"),
    ('{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "auto", "messages": []}}\n'
     '{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "x", "messages": []}}\n',
     "custom_id repeated: a"),
])
def test_bad_openai_input_is_refused_naming_file_and_line(tmp_path, content, message):
    spec = tmp_path / "batch.jsonl"
    spec.write_text(content)
    with pytest.raises(BatchInputError, match=re.escape(message)):
        load_items(spec)


async def test_an_output_file_of_the_other_format_is_refused_before_any_request(fake, tmp_path):
    write_screens(tmp_path / "imgs", 1)
    spec = tmp_path / "requests.jsonl"
    spec.write_text(openai_line("a", "imgs/sub/screen-00.png"))
    out = tmp_path / "results.jsonl"
    out.write_text(json.dumps({"custom_id": "a", "status": "ok", "expert": "calendar"}) + "\n")
    with pytest.raises(BatchInputError, match=re.escape(f"{out}:1: not a result line of this batch's input format (openai)")):
        await run_batch(config(fake), load_items(spec), out, progress=False)
    assert not fake.requests


async def test_command_line_via_gateway_and_openai_format(fake, tmp_path):
    names = write_screens(tmp_path / "in", 2)
    common = ["--config", str(TINY_CONFIG), "--base-url", fake.base_url, "--no-progress"]
    native_out = tmp_path / "native.jsonl"
    argv = common + ["--input", str(tmp_path / "in"), "--output", str(native_out), "--via-gateway"]
    assert await asyncio.to_thread(main, argv) == 0
    assert {r.body["model"] for r in fake.chat_requests()} == {"auto"}
    assert_each_id_ok_once(native_out, names)
    spec = tmp_path / "requests.jsonl"
    spec.write_text(openai_line("a", "in/screen-01.png") + openai_line("b", "in/missing.png"))
    openai_out = tmp_path / "openai.jsonl"
    argv = common + ["--input", str(spec), "--output", str(openai_out)]
    assert await asyncio.to_thread(main, argv) == 1
    codes = {r["custom_id"]: r["error"] and r["error"]["code"] for r in lines(openai_out)}
    assert codes == {"a": None, "b": "InvalidImageError"}
