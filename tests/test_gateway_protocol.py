"""The gateway's wire contract without a server: what an `auto` request must carry, and how it is forwarded."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from lora_router.images import prepare_image
from serving.gateway.protocol import (
    GatewayError,
    check_remote_url,
    decode_data_url,
    expert_body,
    parse_auto_request,
    parse_json_object,
    png_as_sent,
)

URL = "data:image/png;base64," + base64.b64encode(b"png bytes").decode()


def image(url: str = URL) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def text(value: str = "Click the highlighted day.") -> dict:
    return {"type": "text", "text": value}


def body(*parts, **extra) -> dict:
    return {"model": "auto", "messages": [{"role": "user", "content": list(parts)}], **extra}


@pytest.mark.parametrize("case, request_body, status, words", [
    ("no messages", {"model": "auto"}, 400, "'messages' must be a non-empty list"),
    ("no user turn", {"model": "auto", "messages": [{"role": "system", "content": "x"}]}, 400, "no user turn"),
    ("text only", {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}, 400, "has no image"),
    ("two images", body(image(), image()), 400, "has 2 images"),
    ("image without url", body({"type": "image_url", "image_url": {}}), 400, "image_url.url is missing"),
    ("content not a list", {"model": "auto", "messages": [{"role": "user", "content": 3}]}, 400,
     "must be a string or a list"),
    ("stream not a bool", body(image(), stream="yes"), 400, "'stream' must be true or false"),
])
def test_bad_auto_requests_are_400_naming_the_problem(case, request_body, status, words):
    with pytest.raises(GatewayError) as info:
        parse_auto_request(request_body)
    assert info.value.status == status and words in info.value.message
    assert set(info.value.body()["error"]) == {"message", "type", "param", "code"}


def test_only_the_last_user_turn_counts():
    request = {"model": "auto", "messages": [{"role": "user", "content": [image(), image()]},
                                             {"role": "assistant", "content": "ok"},
                                             {"role": "user", "content": [text(), image()]}]}
    parsed = parse_auto_request(request)
    assert (parsed.image.message_index, parsed.image.part_index, parsed.has_text) == (2, 1, True)


def test_the_expert_gets_the_callers_request_with_the_prepared_image_and_its_parameters():
    request = body(image("data:image/jpeg;base64,AAAA"), text("Open March 3."), max_tokens=9, temperature=0.2,
                   stream=True, seed=4, stop=["\n"])
    sent = expert_body(parse_auto_request(request), "calendar", URL, "default prompt")
    assert sent["model"] == "calendar"
    assert sent["messages"][0]["content"] == [image(URL), text("Open March 3.")]
    assert {k: sent[k] for k in ("max_tokens", "temperature", "stream", "seed", "stop")} == \
        {"max_tokens": 9, "temperature": 0.2, "stream": True, "seed": 4, "stop": ["\n"]}
    assert request["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/jpeg")  # caller's untouched


def test_a_turn_without_text_gets_the_experts_default_prompt():
    sent = expert_body(parse_auto_request(body(image())), "calendar", URL, "Click the highlighted day.")
    assert sent["messages"][0]["content"] == [image(URL), text("Click the highlighted day.")]


@pytest.mark.parametrize("url, words", [
    ("data:image/png,rawbytes", "base64 data URL"),
    ("data:image/png;base64,@@@", "not valid base64"),
])
def test_bad_data_urls(url, words):
    with pytest.raises(GatewayError, match=words):
        decode_data_url(url)


def test_data_url_bytes():
    assert decode_data_url(URL) == b"png bytes"


@pytest.mark.parametrize("url, allowed, words", [
    ("http://169.254.169.254/latest/meta-data", [], "refused"),
    ("https://evil.example/x.png", ["images.example"], "refused"),
    ("file:///etc/passwd", ["images.example"], "not supported"),
])
def test_network_image_urls_are_refused_unless_their_host_is_allowed(url, allowed, words):
    with pytest.raises(GatewayError, match=words) as info:
        check_remote_url(url, allowed)
    assert info.value.status == 400


def test_an_allowed_host_passes():
    assert check_remote_url("https://images.example/a.png", ["images.example"]) == "https://images.example/a.png"


@pytest.mark.parametrize("raw, words", [(b"{nope", "not valid JSON"), (b"[1, 2]", "must be a JSON object")])
def test_malformed_bodies(raw, words):
    with pytest.raises(GatewayError, match=words):
        parse_json_object(raw)


def encoded(mode: str = "RGB", size: tuple[int, int] = (64, 48), fmt: str = "PNG", **options) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 120).save(buf, format=fmt, **options)
    return buf.getvalue()


def test_a_png_that_preparing_would_not_change_goes_on_as_it_came():
    data = encoded(compress_level=9)
    kept = png_as_sent(data, max_pixels=None, max_image_pixels=40_000_000)
    assert kept.data_url == "data:image/png;base64," + base64.b64encode(data).decode()
    assert (kept.width, kept.height) == (64, 48)
    # The caller's own base64 is reused as it is.
    payload = base64.b64encode(data).decode()
    assert png_as_sent(data, max_pixels=None, max_image_pixels=40_000_000, encoded=payload).data_url == kept.data_url
    # The pixels vLLM decodes are the ones prepare_image would have sent.
    prepared = prepare_image(data)
    assert prepared.data_url != kept.data_url
    assert [Image.open(io.BytesIO(base64.b64decode(p.data_url.split(",")[1]))).tobytes() for p in (kept, prepared)] \
        == [Image.open(io.BytesIO(data)).convert("RGB").tobytes()] * 2


@pytest.mark.parametrize("case, data, max_pixels, cap", [
    ("transparent", encoded("RGBA"), None, 40_000_000),
    ("palette", encoded("P"), None, 40_000_000),
    ("grey", encoded("L"), None, 40_000_000),
    ("over max_pixels", encoded(), 1000, 40_000_000),
    ("over the pixel cap (prepare_image refuses it)", encoded(), None, 1000),
    ("JPEG", encoded(fmt="JPEG"), None, 40_000_000),
    ("truncated", encoded()[:-20], None, 40_000_000),
    ("corrupt chunk", encoded()[:40] + b"x" + encoded()[41:], None, 40_000_000),
])
def test_anything_else_is_prepared(case, data, max_pixels, cap):
    assert png_as_sent(data, max_pixels=max_pixels, max_image_pixels=cap) is None
