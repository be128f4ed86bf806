"""Served router validation (router_client.validate) against the scripted fake vLLM: the requests it sends, the
report files it writes, and the lines it refuses."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from router_client.validate import main, validate_served
from tests.fake_vllm import LABELS, FakeVLLM, fake_vllm  # noqa: F401  (fixture)
from training.llava_data import DataError
from training.prompts import ROUTER_USER_PROMPT, router_system_prompt

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


@pytest.mark.parametrize("structured", [False, True])
async def test_served_validation_sends_the_clients_requests_and_writes_the_report(fake, tmp_path, structured):
    data = write_eval_set(tmp_path / "data", ["calendar", "claim-window", "provider-select", "calendar"])
    out = tmp_path / "out"
    # validate_served runs its own event loop, so it runs in a thread while this loop serves the fake.
    report = await asyncio.to_thread(validate_served, data, out, fake.base_url, api_key="secret",
                                     structured_outputs=structured)
    assert (report["correct"], report["count"], report["accuracy"]) == (3, 4, 0.75)
    assert report["per_class"]["provider-select"]["recall"] == 0.0
    assert report["mode"] == f"served router at {fake.base_url}" + (" (structured outputs)" if structured else "")
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["predicted"] for p in predictions] == ["calendar", "claim-window", "calendar", "calendar"]
    assert (out / "metrics.json").exists() and (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    requests = fake.chat_requests("router")
    assert len(requests) == 4
    body = requests[0].body
    system, user = body["messages"]
    assert system == {"role": "system", "content": router_system_prompt(LABELS)}
    assert [part["type"] for part in user["content"]] == ["image_url", "text"]
    assert user["content"][1]["text"] == ROUTER_USER_PROMPT
    assert body["temperature"] == 0 and body["max_tokens"] == 16
    assert body.get("structured_outputs") == ({"choice": list(LABELS)} if structured else None)
    assert requests[0].headers["Authorization"] == "Bearer secret"


async def test_a_line_whose_text_comes_before_the_image_is_refused(fake, tmp_path):
    data = write_eval_set(tmp_path / "data", ["calendar"], human=f"{ROUTER_USER_PROMPT}\n<image>")
    with pytest.raises(DataError, match="served validation sends one image, then the text"):
        await asyncio.to_thread(validate_served, data, tmp_path / "out", fake.base_url, api_key="secret")


async def test_command_line_names_the_failing_line(fake, tmp_path, capsys):
    data = write_eval_set(tmp_path / "data", ["calendar"])
    argv = ["--data", str(data), "--out", str(tmp_path / "out"), "--base-url", fake.base_url, "--api-key", "wrong"]
    assert await asyncio.to_thread(main, argv) == 1
    assert "eval-classification.jsonl:1: AuthenticationError: 401 from POST" in capsys.readouterr().err
