"""The batch runner against the real routing gateway in front of a vLLM CPU server: an OpenAI Batch file with
model auto, and native screenshots routed on the gateway."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
import yaml

from lora_router.images import prepare_image
from router_client.batch import load_items, run_batch
from router_client.config import ClientConfig
from tests.conftest import EXPERTS
from training.tasks import build_example

pytestmark = pytest.mark.integration


def _screens(folder: Path) -> list[Path]:
    """Two screenshots of each kind."""
    folder.mkdir()
    paths = []
    for i, kind in enumerate(EXPERTS * 2):
        path = folder / f"{kind}-{i}.png"
        build_example(kind, 800 + i).image.save(path)
        paths.append(path)
    return paths


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_openai_batch_with_model_auto_answers_each_id_once_from_the_routed_expert(gw, tmp_path):
    screens = _screens(tmp_path / "screens")
    bodies = {}
    for i, path in enumerate(screens):
        # Half by local path (the batch inlines them), half as data URLs (sent as they are).
        url = path.relative_to(tmp_path).as_posix() if i % 2 else prepare_image(path).data_url
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe this screen."}]
        bodies[f"item-{i}"] = {"model": "auto", "max_tokens": 4, "temperature": 0,
                               "messages": [{"role": "user", "content": content}]}
    spec = tmp_path / "requests.jsonl"
    spec.write_text("".join(json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                                        "body": body}) + "\n" for cid, body in bodies.items()))
    cfg = ClientConfig.from_deployment(gw.config, base_url=gw.base_url)
    out = tmp_path / "results.jsonl"
    summary = asyncio.run(run_batch(cfg, load_items(spec), out, concurrency=2, progress=False))
    assert (summary.ok, summary.failed) == (len(bodies), 0), _lines(out)

    done = [r for r in _lines(out) if r["response"] and r["response"]["status_code"] == 200]
    assert Counter(r["custom_id"] for r in done) == Counter(list(bodies))
    experts = {}
    for record in done:
        body = record["response"]["body"]
        assert record["error"] is None and body["model"] in EXPERTS
        assert body["model"] == body["routing"]["expert"] and body["routing"]["mode"] == "choice"
        experts[record["custom_id"]] = body["model"]

    async def route_headers() -> dict[str, str]:
        # The same requests straight to the gateway: its x-route-expert names the model each line answered with.
        async with aiohttp.ClientSession(headers=gw.headers) as session:
            async def one(body: dict) -> str:
                url = body["messages"][0]["content"][0]["image_url"]["url"]
                if not url.startswith("data:"):
                    body = json.loads(json.dumps(body))
                    body["messages"][0]["content"][0]["image_url"]["url"] = prepare_image(tmp_path / url).data_url
                async with session.post(gw.base_url + "/chat/completions", json=body) as r:
                    assert r.status == 200, await r.text()
                    return r.headers["x-route-expert"]
            return {cid: await one(body) for cid, body in bodies.items()}

    assert asyncio.run(route_headers()) == experts

    # A rerun has nothing left to do: no request, no new line.
    again = asyncio.run(run_batch(cfg, load_items(spec), out, progress=False))
    assert (again.skipped, again.ok, again.failed) == (len(bodies), 0, 0)
    assert len(_lines(out)) == len(done)


def test_native_batch_via_gateway_routes_as_the_client_does(gw, tmp_path):
    _screens(tmp_path / "screens")
    items = load_items(tmp_path / "screens")
    cfg = ClientConfig.from_deployment(gw.config, base_url=gw.base_url, expert_max_tokens=4)
    client_side, gateway = tmp_path / "client.jsonl", tmp_path / "gateway.jsonl"
    asyncio.run(run_batch(cfg, items, client_side, concurrency=2, progress=False))
    summary = asyncio.run(run_batch(cfg, items, gateway, concurrency=2, progress=False, via_gateway=True))
    assert (summary.ok, summary.failed) == (len(items), 0), _lines(gateway)
    by_client = {r["custom_id"]: r for r in _lines(client_side)}
    for line in _lines(gateway):
        assert line["status"] == "ok" and line["expert"] in EXPERTS
        assert line["expert"] == by_client[line["custom_id"]]["expert"]
        assert line["confidence"] == pytest.approx(by_client[line["custom_id"]]["confidence"], abs=1e-2)
        assert set(line["timings"]) == {"image_s", "route_s", "expert_s", "total_s"}


# Run by both interpreters: route each screenshot with the Python client, client-side and through the gateway.
CLIENT_SCRIPT = textwrap.dedent("""
    import asyncio, json, sys
    from router_client import ClientConfig, RouterClient
    from lora_router.deployment import load_config

    async def main(config, screens):
        out = []
        async with RouterClient(ClientConfig.from_deployment(load_config(config))) as client:
            for screen in screens:
                for result in (await client.process(screen), await client.process_via_gateway(screen)):
                    out.append({"expert": result.decision.expert, "text": result.result.text})
        print(json.dumps(out))

    asyncio.run(main(sys.argv[1], sys.argv[2:]))
""")


def test_plain_install_routes_through_a_running_deployment_as_the_full_install_does(plain_python, gw, tmp_path):
    config = tmp_path / "deployment.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": gw.config.model.path, "served_name": gw.config.model.served_name},
        "router": {"name": gw.config.router.name, "path": str(gw.config.router.path)},
        "experts": [{"name": e.name, "path": str(e.path), "prompt": e.prompt} for e in gw.config.experts],
        "engine": {"port": gw.port, "api_key": gw.config.engine.api_key},
        "client": {"router_mode": "choice"},
    }))
    screens = tmp_path / "screens"
    screens.mkdir()
    for i, kind in enumerate(EXPERTS):
        build_example(kind, 900 + i).image.save(screens / f"{kind}.png")

    def batch(python: Path, name: str) -> dict[str, tuple[str, str]]:
        out = tmp_path / f"{name}.jsonl"
        # One at a time: bf16 answers depend on what else shares vLLM's batch, so concurrent runs may differ in text.
        done = subprocess.run([python, "-m", "router_client.batch", "--config", str(config), "--input", str(screens),
                               "--output", str(out), "--via-gateway", "true", "--concurrency", "1"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(lines) == len(EXPERTS) and all(line["status"] == "ok" for line in lines), lines
        return {line["custom_id"]: (line["expert"], line["answer"]) for line in lines}

    assert batch(plain_python, "plain") == batch(Path(sys.executable), "full")

    def client(python: Path) -> list[dict]:
        done = subprocess.run([python, "-c", CLIENT_SCRIPT, str(config), *map(str, sorted(screens.iterdir()))],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    plain = client(plain_python)
    assert len(plain) == 2 * len(EXPERTS) and plain == client(Path(sys.executable))
