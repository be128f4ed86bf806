"""Every error path of the gateway's own code, on the fake vLLM (tests/fake_vllm.py), which fails on cue: timeouts,
relayed 5xx, the admin API's failed steps, a failed shadow request, a caller that leaves mid-route, a restart that
fails; plus what the gateway promises around them: bounded metric labels, /metrics behind the key on a public bind,
request ids through both stages, one access-log line per request."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import time
from collections.abc import Callable

import pytest
from PIL import Image

from lora_router.capture import CaptureItem, CaptureStore, held_out
from serving.gateway.metrics import PREFIX
from tests.fake_vllm import LABELS, Fault, fake_vllm  # noqa: F401  (fixture)
from tests.gateway_on_fake import ADMIN_KEY, KEY, assert_openai_error, gateway_on, samples, stand_in_adapter

REQUESTS = f"{PREFIX}_requests_total"
IN_FLIGHT = f"{PREFIX}_requests_in_flight"


def png_url(size: tuple[int, int] = (64, 48)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 10)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def auto_body(url: str | None = None, **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": url or png_url()}}, {"type": "text", "text": "Go."}]
    return {"model": "auto", "max_tokens": 8, "messages": [{"role": "user", "content": content}], **extra}


async def eventually(condition: Callable[[], bool], what: str, deadline_s: float = 10.0) -> None:
    """Wait until `condition()` holds (polled on the event loop), failing with `what` after the deadline."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, f"still not {what} after {deadline_s} s"
        await asyncio.sleep(0.01)


async def error_of(response) -> dict:
    return assert_openai_error(response.status, await response.json())


# --------------------------------------------------------------------------------------------- upstream faults


async def test_vllm_silent_past_the_timeout_is_504_upstream_timeout(fake_vllm, tmp_path):
    async with gateway_on(fake_vllm, tmp_path, gateway={"upstream_timeout_s": 0.2}) as (gw, client):
        fake_vllm.faults.append(Fault(stall_s=30))  # the router request: vLLM sends nothing
        r = await client.post("/v1/chat/completions", json=auto_body())
        error = await error_of(r)
        assert (r.status, error["code"]) == (504, "upstream_timeout") and "0.2 s" in error["message"]
        await eventually(lambda: fake_vllm.cancelled == 1, "the stalled vLLM request aborted")
        assert samples(gw, REQUESTS)[(("expert", "none"), ("model", "auto"), ("outcome", "timeout"))] == 1
        assert samples(gw, IN_FLIGHT)[()] == 0


@pytest.mark.parametrize("model", ["auto", "calendar"])
async def test_a_vllm_5xx_is_502_upstream_failed_with_vllms_message(fake_vllm, tmp_path, model):
    async with gateway_on(fake_vllm, tmp_path) as (gw, client):
        fake_vllm.faults.append(Fault(status=500, message="EngineCore died"))
        r = await client.post("/v1/chat/completions", json=auto_body(model=model))
        error = await error_of(r)
        assert (r.status, error["code"], error["type"]) == (502, "upstream_failed", "server_error")
        assert "vLLM answered 500: EngineCore died" in error["message"]
        expert = "none" if model == "auto" else model
        assert samples(gw, REQUESTS)[(("expert", expert), ("model", model), ("outcome", "upstream_error"))] == 1


async def test_a_relayed_4xx_keeps_its_status_and_gets_a_code(fake_vllm, tmp_path):
    async with gateway_on(fake_vllm, tmp_path) as (gw, client):
        r = await client.post("/v1/chat/completions", json=auto_body(model="no-such-expert"))
        error = await error_of(r)
        assert (r.status, error["code"], error["param"]) == (404, "model_not_found", "model")
        assert "no-such-expert" in error["message"]
        r = await client.post("/v1/chat/completions", json={"model": "calendar", "messages": "not a list"})
        assert (r.status, (await error_of(r))["code"]) == (400, "invalid_request")


async def test_100_made_up_model_names_add_no_series(fake_vllm, tmp_path):
    async with gateway_on(fake_vllm, tmp_path) as (gw, client):
        r = await client.post("/v1/chat/completions", json=auto_body(model="calendar"))
        assert r.status == 200
        before = samples(gw, REQUESTS)
        for i in range(100):
            r = await client.post("/v1/chat/completions", json=auto_body(model=f"made-up-{i}"))
            assert r.status == 404
        after = samples(gw, REQUESTS)
        assert set(after) - set(before) == {(("expert", "other"), ("model", "other"), ("outcome", "not_found"))}
        assert after[(("expert", "other"), ("model", "other"), ("outcome", "not_found"))] == 100
        assert after[(("expert", "calendar"), ("model", "calendar"), ("outcome", "ok"))] == 1
        metrics = await (await client.get("/metrics")).text()
        assert "made-up" not in metrics


@pytest.mark.parametrize("host, public_metrics, key, status", [
    ("0.0.0.0", False, None, 401),
    ("0.0.0.0", False, "wrong", 401),
    ("0.0.0.0", False, KEY, 200),
    ("0.0.0.0", True, None, 200),
    ("127.0.0.1", False, None, 200),
])
async def test_metrics_need_the_service_key_on_a_public_bind(fake_vllm, tmp_path, host, public_metrics, key, status):
    sections = {"engine": {"host": host}, "gateway": {"public_metrics": public_metrics}}
    async with gateway_on(fake_vllm, tmp_path, **sections) as (gw, client):
        headers = {"Authorization": f"Bearer {key}"} if key else {"Authorization": ""}
        r = await client.get("/metrics", headers=headers)
        assert r.status == status
        if status == 401:
            assert (await error_of(r))["code"] == "invalid_api_key"
        else:
            text = await r.text()
            assert f"{IN_FLIGHT} 0.0" in text and "vllm:num_requests_running" in text  # the gateway's, then vLLM's


# --------------------------------------------------------------------------------------------- request ids, log


async def test_a_request_id_is_followed_through_both_stages_and_logged(fake_vllm, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="serving.gateway.access")
    async with gateway_on(fake_vllm, tmp_path) as (gw, client):
        r = await client.post("/v1/chat/completions", json=auto_body(), headers={"x-request-id": "trace-42"})
        assert r.status == 200 and r.headers["x-request-id"] == "trace-42"
        sent = {seen.body["model"]: seen.headers.get("X-Request-Id") for seen in fake_vllm.chat_requests()}
        assert sent == {"router@r1": "trace-42-router", "calendar@e0": "trace-42-expert"}
        line = next(r.getMessage() for r in caplog.records if r.name == "serving.gateway.access")
        for part in ("request_id=trace-42", "method=POST", "path=/v1/chat/completions", "model=auto",
                     "expert=calendar", "router=router@r1", "status=200", "route_ms=", "total_ms="):
            assert part in line
        # Without one (or with one unfit for a log line), the gateway names the request itself.
        for headers in ({}, {"x-request-id": "two words forged=1"}):
            r = await client.post("/v1/chat/completions", json=auto_body(), headers=headers)
            generated = r.headers["x-request-id"]
            assert len(generated) == 32
            assert fake_vllm.chat_requests()[-1].headers["X-Request-Id"] == f"{generated}-expert"


async def test_json_access_log_lines_and_every_error_names_its_request(fake_vllm, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="serving.gateway.access")
    async with gateway_on(fake_vllm, tmp_path, gateway={"log_format": "json"}) as (gw, client):
        r = await client.post("/v1/chat/completions", data=b"{not json", headers={"x-request-id": "bad-1"})
        assert r.status == 400 and r.headers["x-request-id"] == "bad-1"
        assert (await error_of(r))["code"] == "invalid_json"
        r = await client.post("/v1/chat/completions", json=auto_body(model="a b\nc"))
        assert r.status == 404
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert [(line["request_id"], line["status"], line["model"]) for line in lines][:1] == [("bad-1", 400, "none")]
    assert lines[1]["model"] == "a b\nc" and lines[1]["expert"] == "a b\nc" and lines[1]["status"] == 404
    assert set(lines[0]) == {"request_id", "method", "path", "model", "expert", "router", "status", "route_ms",
                             "total_ms"}


# --------------------------------------------------------------------------------------------- caller leaves


async def test_a_caller_that_leaves_during_routing_cancels_the_router_request(fake_vllm, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="serving.gateway.access")
    async with gateway_on(fake_vllm, tmp_path) as (gw, client):
        fake_vllm.faults.append(Fault(stall_s=30))  # the router request hangs until its caller goes
        call = asyncio.create_task(client.post("/v1/chat/completions", json=auto_body()))
        await eventually(lambda: len(fake_vllm.chat_requests()) == 1, "routing")
        assert samples(gw, IN_FLIGHT)[()] == 1
        call.cancel()
        await eventually(lambda: fake_vllm.cancelled == 1, "the router request cancelled in vLLM")
        await eventually(lambda: samples(gw, IN_FLIGHT)[()] == 0, "the in-flight slot given back")
        assert samples(gw, REQUESTS)[(("expert", "none"), ("model", "auto"), ("outcome", "cancelled"))] == 1
        assert len(fake_vllm.chat_requests()) == 1  # no expert request was sent
        assert any("status=499" in r.getMessage() for r in caplog.records if r.name == "serving.gateway.access")


# --------------------------------------------------------------------------------------------- admin API


def admin(client, method: str, path: str, **kwargs):
    return client.request(method, path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, **kwargs)


async def test_an_adapter_that_answers_as_the_base_model_is_refused_as_noop_and_unloaded(fake_vllm, tmp_path):
    async with gateway_on(fake_vllm, tmp_path) as (gw, client):
        stand_in_adapter(tmp_path / "checkpoints" / "weather")
        r = await admin(client, "POST", "/admin/adapters", json={"name": "weather", "path": "checkpoints/weather"})
        error = await error_of(r)  # the fake answers it exactly as the base model
        assert (r.status, error["code"]) == (400, "adapter_noop") and "weather" in error["message"]
        loads = [s.body["lora_name"] for s in fake_vllm.requests if s.path.endswith("load_lora_adapter")]
        assert len(loads) == 2 and loads[0] == loads[1] and loads[0].startswith("weather@")  # loaded, then unloaded
        state = await (await admin(client, "GET", "/admin/state")).json()
        assert [e["name"] for e in state["experts"]] == list(LABELS)
        fake_vllm.answers["weather"] = "a different answer"
        r = await admin(client, "POST", "/admin/adapters", json={"name": "weather", "path": "checkpoints/weather"})
        assert r.status == 200 and (await r.json())["added"]["name"] == "weather"


async def test_an_adapter_trained_at_other_pixel_limits_is_refused_by_the_admin_api(fake_vllm, tmp_path):
    async with gateway_on(fake_vllm, tmp_path, engine={"max_pixels": 32768}) as (gw, client):
        stand_in_adapter(tmp_path / "checkpoints" / "weather", max_pixels=65536)
        r = await admin(client, "POST", "/admin/adapters", json={"name": "weather", "path": "checkpoints/weather"})
        error = await error_of(r)
        assert (r.status, error["code"]) == (400, "adapter_refused")
        assert ("trained at max_pixels=65536, but the engine serves max_pixels=32768 (engine.max_pixels)"
                in error["message"])
        assert not [s for s in fake_vllm.requests if s.path.endswith("load_lora_adapter")]  # refused before loading


async def test_a_state_file_that_cannot_be_written_changes_nothing(fake_vllm, tmp_path):
    (tmp_path / "state.json.lock").mkdir()  # the state file reads (there is none yet), but its lock cannot be taken
    async with gateway_on(fake_vllm, tmp_path) as (gw, client):
        stand_in_adapter(tmp_path / "checkpoints" / "weather")
        fake_vllm.answers["weather"] = "a different answer"
        r = await admin(client, "POST", "/admin/adapters", json={"name": "weather", "path": "checkpoints/weather"})
        error = await error_of(r)
        assert (r.status, error["code"]) == (500, "state_not_saved") and "nothing changed" in error["message"]
        assert fake_vllm.requests[-1].path == "/v1/unload_lora_adapter"
        r = await client.post("/v1/chat/completions", json=auto_body(model="weather"))
        assert r.status == 404  # never published


async def test_vllm_refusing_to_load_is_502_upstream_failed(fake_vllm, tmp_path):
    async with gateway_on(fake_vllm, tmp_path) as (gw, client):
        stand_in_adapter(tmp_path / "checkpoints" / "weather")
        fake_vllm.load_status = 500
        r = await admin(client, "POST", "/admin/adapters", json={"name": "weather", "path": "checkpoints/weather"})
        error = await error_of(r)
        assert (r.status, error["code"]) == (502, "upstream_failed")
        assert "/v1/load_lora_adapter with 500: scripted load failure" in error["message"]


async def test_a_failed_shadow_request_counts_and_never_reaches_the_caller(fake_vllm, tmp_path):
    async with gateway_on(fake_vllm, tmp_path, gateway={"shadow_fraction": 1.0}) as (gw, client):
        stand_in_adapter(tmp_path / "checkpoints" / "router2", labels=list(LABELS))
        r = await admin(client, "POST", "/admin/router/candidate", json={"path": "checkpoints/router2"})
        assert r.status == 200, await r.text()
        candidate = (await r.json())["candidate"]["served_as"]
        fake_vllm.fail_models[candidate] = 500
        r = await client.post("/v1/chat/completions", json=auto_body(), headers={"x-request-id": "shadowed"})
        assert r.status == 200 and r.headers["x-route-expert"] == "calendar"

        def failed() -> int:
            return samples(gw, f"{PREFIX}_shadow_failures_total").get((("candidate", candidate),), 0)

        await eventually(lambda: failed() == 1, "the shadow failure counted")
        report = await (await admin(client, "GET", "/admin/router/shadow")).json()
        assert (report["failed"], report["compared"]) == (1, 0)
        shadow = [s for s in fake_vllm.chat_requests(candidate)][-1]
        assert shadow.headers["X-Request-Id"] == "shadowed-shadow"


async def test_the_shadow_report_scores_both_routers_on_the_labelled_held_out_captures(fake_vllm, tmp_path):
    """Loading a candidate with capture on routes every labelled capture of the held-out split with the live router
    and with the candidate; captures that are unlabelled or in the training split are left out."""
    store = CaptureStore(tmp_path / "captures", max_items=1000, max_age_s=1e9, max_bytes=1 << 30)
    scored = []
    for n in range(40):
        item_id, label = f"c{n:02d}", LABELS[n % 3] if n % 5 else None
        png = f"screen:{label}:{n}".encode()
        store.add(CaptureItem(id=item_id, captured_at=time.time(), router="router@r1", expert=LABELS[0],
                              confidence=0.9, probabilities={}, fallback=None, reasons=["random"], size=len(png),
                              label=label), png)
        if label is not None and held_out(item_id):
            scored.append(label)
    assert 0 < len(scored) < 32  # some of each kind left out
    fake_vllm.routes["router@r1"] = lambda png: LABELS[0]  # the live router names the first label, always
    # The candidate names the right one (and anything for its warm-up's image).
    fake_vllm.route = lambda png: png.split(b":")[1].decode() if png.startswith(b"screen:") else LABELS[0]
    gateway = {"shadow_fraction": 0.0, "capture": {"dir": str(tmp_path / "captures")}}
    async with gateway_on(fake_vllm, tmp_path, gateway=gateway) as (gw, client):
        stand_in_adapter(tmp_path / "checkpoints" / "router2", labels=list(LABELS))
        r = await admin(client, "POST", "/admin/router/candidate", json={"path": "checkpoints/router2"})
        assert r.status == 200, await r.text()
        await eventually(lambda: (gw.lifecycle.shadow_report()["labelled"] or {}).get("scored") == len(scored),
                         "every labelled held-out capture scored")
        report = await (await admin(client, "GET", "/admin/router/shadow")).json()
    assert report["compared"] == 0  # no live traffic: the scores come from the captures alone
    assert report["labelled"] == {
        "count": len(scored), "scored": len(scored), "failed": 0,
        "live": {"correct": scored.count(LABELS[0]), "accuracy": round(scored.count(LABELS[0]) / len(scored), 4)},
        "candidate": {"correct": len(scored), "accuracy": 1.0}}


# --------------------------------------------------------------------------------------------- a failed restart


async def test_restarts_that_fail_leave_503_then_the_launcher_gives_up(fake_vllm, tmp_path, monkeypatch):
    from serving import launcher
    from serving.launcher import ServerError, VLLMServer

    gateway = {"max_restarts": 2, "restart_backoff_s": 0.01, "restart_backoff_max_s": 0.01}
    async with gateway_on(fake_vllm, tmp_path, gateway=gateway) as (gw, client):
        server = VLLMServer(gw.config, log_path=tmp_path / "vllm.log")
        server.gateway = gw
        attempts, answers = [], []

        async def died() -> str:
            return "died: its API server exited (code 3)"

        async def launch(adapters, warm_up, probe):
            # While vLLM is being restarted, callers are told so.
            answers.append(await client.post("/v1/chat/completions", json=auto_body()))
            attempts.append([a.served_as for a in adapters])
            raise ServerError("vLLM exited with code 3")

        # No vLLM process here: its death, its end and its start are the launcher's to script.
        monkeypatch.setattr(server, "_wait_dead", died)
        monkeypatch.setattr(server, "_end_vllm", lambda: None)
        monkeypatch.setattr(server, "_launch_vllm", launch)
        monkeypatch.setattr(launcher, "check_unchanged", lambda adapters: None)
        await server._supervise()
        assert not gw.ready and server.restarts == 2 and len(attempts) == 2
        assert "its restarts are spent (2 of gateway.max_restarts=2); giving up" in server.failure
        assert attempts[0] == ["router@r1", "calendar@e0", "claim-window@e1", "provider-select@e2"]
        for r in answers:
            error = await error_of(r)
            assert (r.status, error["code"], r.headers["Retry-After"]) == (503, "upstream_unavailable", "5")
        with pytest.raises(ServerError, match="giving up"):
            server.check_alive()


async def test_the_drain_waits_on_the_requests_the_gateway_holds(fake_vllm, tmp_path):
    from serving.launcher import VLLMServer

    async with gateway_on(fake_vllm, tmp_path) as (gw, client):
        server = VLLMServer(gw.config, log_path=tmp_path / "vllm.log")
        server.gateway = gw
        fake_vllm.faults.append(Fault(stall_s=30))
        call = asyncio.create_task(client.post("/v1/chat/completions", json=auto_body()))
        await eventually(lambda: server._busy() == 1, "the request held counted")
        call.cancel()
        await eventually(lambda: server._busy() == 0, "the request's end counted")
