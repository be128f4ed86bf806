"""Served router validation (benchmarks.validate_served) against the scripted fake vLLM: the requests it sends, the
report files it writes, and the lines it refuses."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from benchmarks.validate_served import main, validate_served
from lora_router.manifest import AdapterManifest
from lora_router.prompts import ROUTER_USER_PROMPT, router_system_prompt
from tests.fake_vllm import LABELS, FakeVLLM, Fault, fake_vllm  # noqa: F401  (fixture)
from training.llava_data import DataError

pytestmark = pytest.mark.timeout(30)

COLORS = {"calendar": (255, 0, 0), "claim-window": (0, 255, 0), "provider-select": (0, 0, 255)}


def write_eval_set(folder: Path, golds: list[str], human: str = f"<image>\n{ROUTER_USER_PROMPT}") -> Path:
    """A classification eval set: one screenshot per gold label, coloured by its label."""
    (folder / "images").mkdir(parents=True)
    lines = []
    for i, gold in enumerate(golds):
        Image.new("RGB", (40, 30), COLORS[gold]).save(folder / "images" / f"{i}.png")
        lines.append({"id": f"s{i}", "image": f"images/{i}.png",
                      "conversations": [{"from": "system", "value": router_system_prompt(LABELS)},
                                        {"from": "human", "value": human}, {"from": "gpt", "value": gold}]})
    path = folder / "eval-classification.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture
def fake(fake_vllm: FakeVLLM) -> FakeVLLM:
    """The fake router answers the label of each screenshot's colour, except provider-select: calendar."""
    by_color = {color: label for label, color in COLORS.items()}
    answers = {**by_color, COLORS["provider-select"]: "calendar"}
    fake_vllm.route = lambda png: answers[Image.open(io.BytesIO(png)).convert("RGB").getpixel((0, 0))]
    fake_vllm.api_key = "secret"
    return fake_vllm


async def test_served_validation_routes_in_both_client_modes_and_writes_the_report(fake, tmp_path):
    data = write_eval_set(tmp_path / "data", ["calendar", "claim-window", "provider-select", "calendar"])
    out = tmp_path / "out"
    # validate_served runs its own event loop, so it runs in a thread while this loop serves the fake.
    report = await asyncio.to_thread(validate_served, data, out, fake.base_url, api_key="secret")
    assert (report["correct"], report["count"], report["accuracy"]) == (3, 4, 0.75)
    assert report["per_class"]["provider-select"]["recall"] == 0.0
    assert report["mode"] == f"served router at {fake.base_url} (one-token)"
    assert report["router_modes"] == {"compared": 4, "disagree": 0, "disagreeing_ids": []}
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["predicted"] for p in predictions] == ["calendar", "claim-window", "calendar", "calendar"]
    # The fake gives the answer's first token -0.1 and every other label -6: scores as the client reads them.
    assert predictions[1]["scores"] == {"calendar": -6.0, "claim-window": -0.1, "provider-select": -6.0}
    assert report["calibration"]["fitted"]["count"] == 4
    for name in ("metrics.json", "confusion.png", "reliability.png"):
        assert (out / name).stat().st_size > 0
    requests = fake.chat_requests("router")
    assert len(requests) == 8  # choice and one-token per screenshot
    choice = [r.body for r in requests if "structured_outputs" in r.body]
    one_token = [r.body for r in requests if "logprob_token_ids" in r.body]
    assert len(choice) == len(one_token) == 4
    assert choice[0]["structured_outputs"] == {"choice": list(LABELS)}
    assert one_token[0]["max_tokens"] == 1 and len(one_token[0]["logprob_token_ids"]) == len(LABELS)
    system, user = one_token[0]["messages"]
    assert system == {"role": "system", "content": router_system_prompt(LABELS)}
    assert [part["type"] for part in user["content"]] == ["image_url", "text"]
    assert user["content"][1]["text"] == ROUTER_USER_PROMPT
    assert one_token[0]["temperature"] == 0
    assert requests[0].headers["Authorization"] == "Bearer secret"


async def test_the_two_modes_disagreeing_is_reported(fake, tmp_path):
    # One-token's first token now always says claim-window; choice still answers each screenshot's colour.
    fake.first_token_logprobs = {"calendar": -3.0, "claim-window": -0.2, "provider-select": -4.0}
    data = write_eval_set(tmp_path / "data", ["claim-window", "calendar"])
    report = await asyncio.to_thread(validate_served, data, tmp_path / "out", fake.base_url, api_key="secret")
    assert report["router_modes"]["disagree"] == 1 and report["router_modes"]["disagreeing_ids"] == ["s1"]


async def test_a_line_whose_text_comes_before_the_image_is_refused(fake, tmp_path):
    data = write_eval_set(tmp_path / "data", ["calendar"], human=f"{ROUTER_USER_PROMPT}\n<image>")
    with pytest.raises(DataError, match="served validation sends one image, then the text"):
        await asyncio.to_thread(validate_served, data, tmp_path / "out", fake.base_url, api_key="secret")


async def test_command_line_names_the_failing_line(fake, tmp_path, capsys):
    data = write_eval_set(tmp_path / "data", ["calendar"])
    # The line's first routing request is refused (faults play on chat requests only).
    fake.faults.append(Fault(status=400, message="image too large"))
    argv = ["--data", str(data), "--out", str(tmp_path / "out"), "--base-url", fake.base_url, "--api-key", "secret"]
    assert await asyncio.to_thread(main, argv) == 1
    assert "eval-classification.jsonl:1: BadRequestError: 400 from POST" in capsys.readouterr().err


async def test_command_line_names_a_refused_tokenizer_request(fake, tmp_path, capsys):
    data = write_eval_set(tmp_path / "data", ["calendar"])
    argv = ["--data", str(data), "--out", str(tmp_path / "out"), "--base-url", fake.base_url, "--api-key", "wrong"]
    assert await asyncio.to_thread(main, argv) == 1
    err = capsys.readouterr().err
    assert "the labels' first tokens: AuthenticationError: 401 from POST" in err and "/tokenize" in err


async def test_write_calibration_stores_temperature_and_threshold_in_the_manifest(fake, tmp_path, capsys):
    adapter = tmp_path / "router"
    adapter.mkdir()
    AdapterManifest(base_model="b", base_model_fingerprint="f", rank=8, target_modules=["q_proj"],
                    labels=list(LABELS), system_prompt=router_system_prompt(LABELS)).write(adapter)
    data = write_eval_set(tmp_path / "data", ["calendar", "claim-window", "provider-select", "calendar"])
    argv = ["--data", str(data), "--out", str(tmp_path / "out"), "--base-url", fake.base_url, "--api-key", "secret",
            "--adapter", str(adapter), "--write_calibration", "true"]
    assert await asyncio.to_thread(main, argv) == 0
    stored = AdapterManifest.read(adapter).calibration
    fitted = json.loads((tmp_path / "out" / "metrics.json").read_text())["calibration"]["fitted"]
    assert stored == fitted and stored["temperature"] > 0 and stored["count"] == 4
    # Validated again, the stored calibration is scored on the set as it stands.
    assert await asyncio.to_thread(main, argv[:-2]) == 0
    again = json.loads((tmp_path / "out" / "metrics.json").read_text())["calibration"]["with_manifest"]
    assert again["threshold"] == stored["threshold"] and again["coverage"] == stored["coverage"]
    assert "with the manifest's calibration" in capsys.readouterr().out
