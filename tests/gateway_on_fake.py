"""The routing gateway in-process on the fake vLLM (tests/fake_vllm.py): every path of the gateway's own code, with
faults only a scripted server can produce on cue. The adapters are stand-in folders (config, one LoRA weight,
manifest): the gateway checks them as at start, and the fake serves them by name."""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from lora_router.deployment import from_dict
from lora_router.manifest import AdapterManifest
from serving.adapters import AdapterInfo
from serving.gateway.app import Gateway
from serving.lifecycle import AdapterSet
from tests.fake_vllm import LABELS, FakeVLLM

KEY = "service-key"
ADMIN_KEY = "admin-key"


def stand_in_adapter(folder: Path, labels: list[str] | None = None, **manifest: Any) -> Path:
    """An adapter folder start-up's checks accept: a rank-8 LoRA config, one language-model LoRA weight (a
    hand-written safetensors file) and a manifest (a router's with `labels`)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "bias": "none",
                                                            "target_modules": ["q_proj"]}))
    key = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
    header = json.dumps({key: {"dtype": "F32", "shape": [1, 1], "data_offsets": [0, 4]}}).encode()
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0\0\0")
    AdapterManifest(base_model="tiny", base_model_fingerprint="f", rank=8, target_modules=["q_proj"], labels=labels,
                    **manifest).write(folder)
    return folder


@contextlib.asynccontextmanager
async def gateway_on(fake: FakeVLLM, root: Path, **sections: dict[str, Any]) -> AsyncIterator[
        tuple[Gateway, TestClient]]:
    """A ready gateway in front of `fake`, serving router@r1 and the fake's experts as <name>@e<i>, its adapters
    under root/checkpoints; `sections` update the deployment's (engine, gateway, client). The client sends the
    service key."""
    checkpoints = root / "checkpoints"
    router = stand_in_adapter(checkpoints / "router", labels=list(LABELS))
    experts = [stand_in_adapter(checkpoints / name) for name in LABELS]
    data = {
        "model": {"path": "tiny", "served_name": "base"},
        "router": {"name": "router", "path": str(router)},
        "experts": [{"name": n, "path": str(p), "prompt": f"Do the {n} task."} for n, p in zip(LABELS, experts)],
        "engine": {"port": 0, "api_key": KEY, "max_loras": 8, "max_lora_rank": 8, **sections.get("engine", {})},
        "gateway": {"admin_api_key": ADMIN_KEY, "adapter_dirs": [str(checkpoints)],
                    "state_file": str(root / "state.json"), **sections.get("gateway", {})},
        "client": {"router_mode": "choice", **sections.get("client", {})},
    }
    config = from_dict(data, root=root)
    adapters = AdapterSet(router=AdapterInfo("router", router, 8, "r1", labels=LABELS),
                          experts=tuple(AdapterInfo(n, p, 8, f"e{i}", prompt=f"Do the {n} task.")
                                        for i, (n, p) in enumerate(zip(LABELS, experts))))
    gateway = Gateway(config, f"http://127.0.0.1:{fake.port}", "internal", adapters, base=None, config_adapters=[],
                      replica="test-replica")
    await gateway.open()
    await gateway.resolve_policy()
    gateway.ready = True
    client = TestClient(TestServer(gateway.app()), headers={"Authorization": f"Bearer {KEY}"})
    await client.start_server()
    try:
        yield gateway, client
    finally:
        await client.close()
        await gateway.close()


def samples(gateway: Gateway, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The gateway's own samples of one series, by their sorted labels."""
    return {tuple(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(gateway.metrics.text().decode())
            for s in family.samples if s.name == name}


def assert_openai_error(status: int, body: Any) -> dict[str, Any]:
    """An error answer in OpenAI's shape: {"error": {message, type, param, code}}, with a code; the error object."""
    assert status >= 400, status
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and isinstance(error["code"], str) and error["code"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    return error
