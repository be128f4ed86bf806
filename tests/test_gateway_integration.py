"""The routing gateway in front of a real vLLM CPU server, called with the official `openai` client."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import time
from pathlib import Path

import aiohttp
import openai
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from lora_router.images import prepare_image
from lora_router.jsonl import read_jsonl
from router_client.client import RouterClient
from router_client.config import ClientConfig
from tests.conftest import EXPERTS
from tests.conftest import GW_ADMIN as ADMIN
from tests.conftest import GW_KEY as KEY
from training.captures import main as export_captures
from training.tasks import build_example

pytestmark = pytest.mark.integration


def _data_url(image: Image.Image) -> str:
    return prepare_image(image).data_url


def _messages(url: str, text: str | None = "Describe this screen.") -> list[dict]:
    content: list[dict] = [{"type": "image_url", "image_url": {"url": url}}]
    if text is not None:
        content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)


def _counters(text: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def _metrics(server) -> dict[tuple, float]:
    async with aiohttp.ClientSession() as session:
        async with session.get(server.root_url + "/metrics") as r:
            return _counters(await r.text())


def test_auto_answers_with_the_expert_the_client_routes_to(gw):
    client = _client(gw)
    cfg = ClientConfig.from_deployment(gw.config, base_url=gw.base_url, router_mode="choice")
    for i, kind in enumerate(EXPERTS):
        image = build_example(kind, 900 + i).image
        raw = client.chat.completions.with_raw_response.create(
            model="auto", messages=_messages(_data_url(image)), max_tokens=6, temperature=0)
        completion = raw.parse()
        expert = raw.headers["x-route-expert"]

        async def route():
            async with RouterClient(cfg) as rc:
                return await rc.route(image)

        assert expert == asyncio.run(route()).expert
        assert completion.model == expert and expert in EXPERTS
        assert 0 < float(raw.headers["x-route-confidence"]) <= 1 and float(raw.headers["x-route-ms"]) > 0
        routing = completion.model_extra["routing"]
        assert routing["expert"] == expert and routing["mode"] == "choice"
        # The router's own answer and its cost come along, so a gateway-routed batch line records them too.
        assert routing["router_text"] == expert and routing["router_prompt_tokens"] > 0
        assert routing["router_completion_tokens"] >= 1


def test_streaming_yields_the_same_text_as_the_plain_call(gw):
    image_url = _data_url(build_example("calendar", 950).image)

    async def both():
        client = openai.AsyncOpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0)
        plain = await client.chat.completions.create(model="auto", messages=_messages(image_url), max_tokens=8,
                                                     temperature=0)
        pieces = []
        stream = await client.chat.completions.create(model="auto", messages=_messages(image_url), max_tokens=8,
                                                      temperature=0, stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
        return plain.choices[0].message.content, "".join(pieces)

    plain, streamed = asyncio.run(both())
    assert plain and streamed == plain


def test_models_list_auto_and_every_served_model(gw):
    ids = {m.id for m in _client(gw).models.list()}
    assert {"auto", "base", "router", *EXPERTS} <= ids


def test_a_named_expert_through_the_gateway_equals_vllm_directly(gw):
    body = {"model": "calendar", "messages": _messages(_data_url(build_example("calendar", 960).image)),
            "max_tokens": 8, "temperature": 0}
    served = gw.gateway.names.served("calendar")  # vLLM serves the version, callers name the expert

    async def both():
        async with aiohttp.ClientSession() as session:
            async with session.post(gw.base_url + "/chat/completions", json=body, headers=gw.headers) as r:
                via = await r.json()
            async with session.post(gw.upstream_url + "/chat/completions", json={**body, "model": served},
                                    headers=gw.upstream_headers) as r:
                direct = await r.json()
        return via, direct

    via, direct = asyncio.run(both())
    assert via["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
    assert served.startswith("calendar@") and via["model"] == direct["model"] == served


def _png(size) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 10)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


GOOD = _png((64, 48))


@pytest.mark.parametrize("case, body, headers, status, words", [
    ("no image", {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}, None, 400, "no image"),
    ("two images", {"model": "auto", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": GOOD}}, {"type": "image_url", "image_url": {"url": GOOD}}]}]},
     None, 400, "2 images"),
    ("undecodable image", {"model": "auto", "messages": _messages(
        "data:image/png;base64," + base64.b64encode(b"not a png").decode())}, None, 400, "not an image"),
    ("image over the pixel cap", {"model": "auto", "messages": _messages(_png((1200, 1000)))}, None, 400,
     "too many pixels"),
    ("network image URL", {"model": "auto", "messages": _messages("http://169.254.169.254/x.png")}, None, 400,
     "refused"),
    ("malformed body", b"{not json", None, 400, "not valid JSON"),
    ("no key", {"model": "auto", "messages": _messages(GOOD)}, {}, 401, "API key"),
    ("wrong key", {"model": "auto", "messages": _messages(GOOD)}, {"Authorization": "Bearer nope"}, 401,
     "API key"),
    ("unknown model", {"model": "no-such-expert", "messages": _messages(GOOD)}, None, 404, "no-such-expert"),
    ("body over the size cap", {"model": "auto", "messages": _messages(GOOD), "pad": "x" * 3_000_000}, None, 413,
     "limit"),
])
def test_bad_requests_get_their_status_and_a_message_naming_the_problem(gw, case, body, headers, status, words):
    async def send():
        async with aiohttp.ClientSession() as session:
            kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
            async with session.post(gw.base_url + "/chat/completions", **kwargs,
                                    headers=gw.headers if headers is None else headers) as r:
                return r.status, await r.json()

    got, answer = asyncio.run(send())
    assert got == status, answer
    assert set(answer["error"]) >= {"message", "type", "param", "code"}
    assert words in answer["error"]["message"], answer


def test_metrics_count_what_was_sent_per_expert_and_outcome(gw):
    client = _client(gw)
    before = asyncio.run(_metrics(gw))
    experts = []
    for i in range(4):
        raw = client.chat.completions.with_raw_response.create(
            model="auto", messages=_messages(_data_url(build_example(EXPERTS[i % 3], 970 + i).image)),
            max_tokens=2, temperature=0)
        experts.append(raw.headers["x-route-expert"])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "no image"}])
    after = asyncio.run(_metrics(gw))

    def delta(expert, outcome):
        key = ("lora_router_gateway_requests_total", (("expert", expert), ("model", "auto"), ("outcome", outcome)))
        return after.get(key, 0) - before.get(key, 0)

    for expert in set(experts):
        assert delta(expert, "ok") == experts.count(expert)
    assert delta("none", "bad_request") == 1


def test_over_the_queue_limit_callers_get_429_with_retry_after(gw):
    body = {"model": "auto", "messages": _messages(GOOD), "max_tokens": 64, "temperature": 0}

    async def burst():
        async with aiohttp.ClientSession(headers=gw.headers) as session:
            async def one():
                async with session.post(gw.base_url + "/chat/completions", json=body) as r:
                    return r.status, r.headers.get("Retry-After")
            return await asyncio.gather(*(one() for _ in range(16)))

    answers = asyncio.run(burst())
    statuses = [s for s, _ in answers]
    assert statuses.count(429) >= 1 and statuses.count(200) >= 8, statuses  # 4 in flight + 4 queued
    assert all(retry for s, retry in answers if s == 429)


def test_a_caller_leaving_mid_stream_cancels_the_upstream_request(gw):
    body = {"model": "auto", "messages": _messages(_data_url(build_example("calendar", 990).image)),
            "max_tokens": 2000, "temperature": 0, "stream": True, "ignore_eos": True}

    async def running() -> float:
        return sum(v for (name, _), v in (await _metrics(gw)).items() if name == "vllm:num_requests_running")

    async def run():
        async with aiohttp.ClientSession(headers=gw.headers) as session:
            async with session.post(gw.base_url + "/chat/completions", json=body) as r:
                assert r.status == 200
                await r.content.readany()  # the first event: the expert is generating
                during = await running()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if await running() == 0:
                return during, True
            await asyncio.sleep(0.5)
        return during, False

    during, stopped = asyncio.run(run())
    assert during == 1, "the streamed request was not running in vLLM"
    assert stopped, "vLLM still runs the request of a caller that left"


async def _captured(session: aiohttp.ClientSession, server, request_id: str) -> dict | None:
    async with session.get(server.root_url + "/admin/captures",
                           headers={"Authorization": f"Bearer {ADMIN}"}) as r:
        assert r.status == 200, await r.text()
        return next((item for item in (await r.json())["items"] if item["id"] == request_id), None)


async def _until_captured(session, server, request_id: str) -> dict:
    """The item once the gateway wrote it (off the caller's path, so a moment after the answer)."""
    deadline = time.monotonic() + 30
    while (item := await _captured(session, server, request_id)) is None:
        assert time.monotonic() < deadline, f"request {request_id} was never captured"
        await asyncio.sleep(0.05)
    return item


def test_flagged_requests_and_feedback_capture_screenshots_with_their_route(gw):
    """x-capture: 1 captures a request with its route; feedback on a request not captured captures it labelled;
    the screenshot comes back byte for byte, owner-only on disk; deleting removes it; feedback is counted."""
    client = _client(gw)
    urls = [_data_url(build_example(kind, 950 + i).image) for i, kind in enumerate(EXPERTS[:2])]
    flagged = client.chat.completions.with_raw_response.create(
        model="auto", messages=_messages(urls[0]), max_tokens=2, extra_headers={"x-capture": "1"})
    plain = client.chat.completions.with_raw_response.create(model="auto", messages=_messages(urls[1]), max_tokens=2)
    flagged_id, plain_id = flagged.headers["x-request-id"], plain.headers["x-request-id"]
    routing = flagged.parse().model_extra["routing"]
    right = next(e for e in EXPERTS if e != plain.headers["x-route-expert"])
    folder = gw.config.capture_path

    async def scenario() -> dict:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        async with aiohttp.ClientSession() as session:
            item = await _until_captured(session, gw, flagged_id)
            assert await _captured(session, gw, plain_id) is None  # neither sampled nor flagged
            async with session.get(f"{gw.root_url}/admin/captures/{flagged_id}/image", headers=admin) as r:
                png = await r.read()
            async with session.post(gw.base_url + "/feedback", headers=gw.headers,
                                    json={"request_id": plain_id, "correct": False, "expert": right}) as r:
                feedback = (r.status, await r.json())
            labelled = await _captured(session, gw, plain_id)
            async with session.get(f"{gw.root_url}/admin/captures?reason=feedback", headers=admin) as r:
                by_reason = [i["id"] for i in (await r.json())["items"]]
            async with session.delete(f"{gw.root_url}/admin/captures/{flagged_id}", headers=admin) as r:
                deleted = r.status
            gone = await _captured(session, gw, flagged_id)
        return {"item": item, "png": png, "feedback": feedback, "labelled": labelled, "by_reason": by_reason,
                "deleted": deleted, "gone": gone}

    seen = asyncio.run(scenario())
    item = seen["item"]
    assert item["reasons"] == ["flagged"]
    assert (item["expert"], item["router"]) == (routing["expert"], routing["router"])
    assert item["probabilities"] == pytest.approx(routing["probabilities"])
    assert seen["png"] == base64.b64decode(urls[0].partition(",")[2])  # the screenshot the router saw
    assert seen["feedback"] == (200, {"request_id": plain_id, "router": plain.headers["x-route-router"],
                                      "routed": plain.headers["x-route-expert"], "correct": False, "label": right,
                                      "captured": True})
    assert seen["labelled"]["label"] == right and seen["labelled"]["reasons"] == ["feedback"]
    assert seen["by_reason"] == [plain_id]
    assert seen["deleted"] == 200 and seen["gone"] is None
    assert not (folder / "images" / f"{flagged_id}.png").exists()
    assert {oct(p.stat().st_mode & 0o777) for p in folder.rglob("*")} <= {"0o600", "0o700"}
    counts = asyncio.run(_metrics(gw))
    key = ("lora_router_gateway_feedback_total",
           (("expert", plain.headers["x-route-expert"]), ("verdict", "wrong")))
    assert counts[key] >= 1


@pytest.mark.parametrize("method, path, body, headers, status, code", [
    ("POST", "/v1/feedback", {"request_id": "never-sent", "correct": True}, "service", 404, "unknown_request"),
    ("POST", "/v1/feedback", {"request_id": "x", "correct": "yes"}, "service", 400, "invalid_feedback"),
    ("POST", "/v1/feedback", {"request_id": "x", "correct": True}, None, 401, "invalid_api_key"),
    ("GET", "/admin/captures", None, None, 401, "invalid_admin_key"),
    ("GET", "/admin/captures", None, "service", 401, "invalid_admin_key"),
    ("GET", "/admin/captures/x/image", None, "service", 401, "invalid_admin_key"),
    ("DELETE", "/admin/captures/x", None, "service", 401, "invalid_admin_key"),
    ("DELETE", "/admin/captures/never-captured", None, "admin", 404, "not_found"),
    ("GET", "/admin/captures?reason=bored", None, "admin", 400, "invalid_request"),
])
def test_feedback_and_capture_routes_refuse_what_they_must(gw, method, path, body, headers, status, code):
    sent = {"service": gw.headers, "admin": {"Authorization": f"Bearer {ADMIN}"}, None: {}}[headers]

    async def call():
        async with aiohttp.ClientSession() as session:
            async with session.request(method, gw.root_url + path, json=body, headers=sent) as r:
                return r.status, await r.json()

    got, answer = asyncio.run(call())
    assert (got, answer["error"]["code"]) == (status, code), answer


def test_the_drift_signal_counts_the_live_router_s_routes_and_feedback(gw):
    client = _client(gw)
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=_messages(_data_url(build_example(EXPERTS[2], 990).image)), max_tokens=2)

    async def read() -> tuple[dict, dict, dict]:
        async with aiohttp.ClientSession() as session:
            async with session.get(gw.root_url + "/admin/drift", headers={"Authorization": f"Bearer {ADMIN}"}) as r:
                before = await r.json()
            async with session.post(gw.base_url + "/feedback", headers=gw.headers,
                                    json={"request_id": raw.headers["x-request-id"], "correct": True}) as r:
                assert r.status == 200
            async with session.get(gw.root_url + "/admin/drift", headers={"Authorization": f"Bearer {ADMIN}"}) as r:
                after = await r.json()
        return before, after, await _metrics(gw)

    before, after, counts = asyncio.run(read())
    assert before["router"] == raw.headers["x-route-router"] and before["routes"] >= 1
    assert set(before["label_mix"]) == set(EXPERTS)
    assert sum(before["label_mix"].values()) == pytest.approx(1.0, abs=1e-3)
    assert after["feedback"] == before["feedback"] + 1
    assert counts[("lora_router_gateway_drift_routes", ())] == after["routes"]


def test_the_review_page_signs_in_lists_filters_labels_undoes_and_its_labels_export(gw, tmp_path):
    """A reviewer's browser at HTTP level: the key once (never in a URL), then a cookie session; labelling needs the
    page's CSRF token; the labels reach the exported dataset."""
    client = _client(gw)
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=_messages(_data_url(build_example(EXPERTS[1], 970).image)), max_tokens=2,
        extra_headers={"x-capture": "1"})
    item_id = raw.headers["x-request-id"]
    review = gw.root_url + "/admin/review"

    async def browse() -> dict:
        seen: dict = {}
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
            await _until_captured(browser, gw, item_id)
            async with browser.get(review, allow_redirects=False) as r:
                seen["unsigned"] = (r.status, r.headers.get("Location"))
            async with browser.post(review + "/login", data={"key": "wrong"}) as r:
                seen["wrong_key"] = r.status
            async with browser.post(review + "/login", data={"key": ADMIN}, allow_redirects=False) as r:
                seen["login"] = (r.status, r.headers["Location"], r.cookies["lora_router_review"]["httponly"],
                                 r.cookies["lora_router_review"]["samesite"])
            async with browser.get(review) as r:
                seen["page"] = (r.status, await r.text(), r.headers["Content-Security-Policy"])
            token = re.search(r'const CSRF = "([0-9a-f]+)"', seen["page"][1]).group(1)
            async with browser.get(review + "/items?reason=flagged") as r:
                seen["flagged"] = await r.json()
            async with browser.get(review + "/items?reason=unlabeled") as r:
                seen["unlabeled_before"] = [i["id"] for i in (await r.json())["items"]]
            label = {"id": item_id, "label": EXPERTS[2]}
            async with browser.post(review + "/label", json=label) as r:
                seen["no_token"] = (r.status, (await r.json())["error"]["code"])
            async with browser.post(review + "/label", json=label,
                                    headers={"X-CSRF-Token": token, "Origin": "https://evil.example"}) as r:
                seen["other_site"] = (r.status, (await r.json())["error"]["code"])
            async with browser.post(review + "/label", json=label, headers={"X-CSRF-Token": token}) as r:
                seen["labelled"] = (await r.json())["label"]
            seen["exported"] = _export_labels(gw.config.capture_path, tmp_path / "labelled")
            async with browser.post(review + "/label", json={"id": item_id, "label": None},
                                    headers={"X-CSRF-Token": token}) as r:  # undo
                seen["undone"] = (await r.json())["label"]
            async with browser.get(review + "/image/" + item_id) as r:
                seen["image"] = (r.status, r.content_type)
        async with aiohttp.ClientSession() as stranger:  # no session cookie: nothing but the sign-in form
            async with stranger.get(review + "/items") as r:
                seen["stranger"] = (r.status, (await r.json())["error"]["code"])
        return seen

    seen = asyncio.run(browse())
    assert seen["unsigned"] == (303, "/admin/review/login")
    assert seen["wrong_key"] == 401
    assert seen["login"] == (303, "/admin/review", True, "Strict") and ADMIN not in seen["login"][1]
    status, page, policy = seen["page"]
    assert status == 200 and "default-src 'none'" in policy
    assert not re.search(r'(src|href)="(https?:)?//', page)  # offline: nothing from another origin
    flagged = seen["flagged"]
    assert item_id in [i["id"] for i in flagged["items"]] and flagged["labels"] == list(EXPERTS)
    assert flagged["counts"]["flagged"] >= 1 and flagged["counts"]["all"] >= flagged["counts"]["flagged"]
    assert item_id in seen["unlabeled_before"]
    assert seen["no_token"] == seen["other_site"] == (403, "csrf_refused")
    assert seen["labelled"] == EXPERTS[2] and seen["exported"][f"captured-{item_id}"] == EXPERTS[2]
    assert seen["undone"] is None
    assert seen["image"] == (200, "image/png")
    assert seen["stranger"] == (401, "invalid_admin_key")


def _export_labels(store: Path, out: Path) -> dict[str, str]:
    """The exported dataset's lines as {id: label} (training.captures export, train and held-out together)."""
    assert export_captures(["export", "--store", str(store), "--out", str(out), "--classes", ",".join(EXPERTS)]) == 0
    lines = read_jsonl(out / "train.jsonl") + read_jsonl(out / "eval.jsonl")
    return {line["id"]: line["adapter"] for line in lines}
