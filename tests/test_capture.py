"""The capture store (lora_router.capture) and the gateway's capture policy and feedback (serving.gateway.capture),
without a server: bounds, owner-only files, deletion, sharing by two replicas, what is captured and why, feedback."""

from __future__ import annotations

import asyncio
import base64
import os
import random
import stat
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lora_router.capture import CaptureError, CaptureItem, CaptureStore
from lora_router.deployment import CaptureConfig, from_dict
from lora_router.images import PreparedImage
from lora_router.routing import RouteDecision
from serving.gateway.capture import Capturer
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.protocol import Feedback, GatewayError, parse_feedback
from serving.gateway.review import ReviewRoutes

PNG = b"\x89PNG\r\n\x1a\n" + b"x" * 100
EXPERTS = ["calendar", "claim-window", "provider-select"]


def _item(item_id: str, at: float, reasons: tuple[str, ...] = ("random",)) -> CaptureItem:
    return CaptureItem(id=item_id, captured_at=at, router="router@1", expert="calendar", confidence=0.9,
                       probabilities={"calendar": 0.9, "claim-window": 0.1}, fallback=None, reasons=list(reasons),
                       size=len(PNG))


def _store(tmp_path, **bounds) -> CaptureStore:
    return CaptureStore(tmp_path / "captures", **{"max_items": 100, "max_age_s": 1e11, "max_bytes": 1 << 30, **bounds})


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_and_folders_are_owner_only_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        store = _store(tmp_path)
        store.add(_item("a", 1e12), PNG)
    finally:
        os.umask(old)
    folder = tmp_path / "captures"
    assert _mode(folder) == _mode(folder / "images") == 0o700
    assert {_mode(p) for p in folder.rglob("*") if p.is_file()} == {0o600}
    assert store.png(store.get("a")) == PNG


@pytest.mark.parametrize("bound, expected", [
    ({"max_items": 2}, ["c", "d"]),
    ({"max_age_s": 25}, ["c", "d"]),  # a and b were captured 40 and 30 s ago
    ({"max_bytes": 2 * len(PNG)}, ["c", "d"]),
])
def test_an_add_drops_the_oldest_items_over_a_bound_with_their_images(tmp_path, bound, expected):
    store = _store(tmp_path, **bound)
    now = time.time()
    for n, item_id in enumerate("abcd"):
        store.add(_item(item_id, now - 40 + 10 * n), PNG)
    store.prune()
    assert list(store.items()) == expected
    assert sorted(p.stem for p in (tmp_path / "captures" / "images").iterdir()) == expected


def test_feedback_labels_and_deletion_and_the_index_compacted_on_the_next_add(tmp_path):
    store = _store(tmp_path)
    store.add(_item("a", 1.0), PNG)
    updated = store.update("a", feedback={"correct": False, "expert": "claim-window"}, label="claim-window")
    assert updated.label == store.get("a").label == "claim-window"
    store.add(_item("b", 2.0), PNG)
    index = (tmp_path / "captures" / "index.jsonl").read_text().splitlines()
    assert len(index) == 2 and store.get("a").feedback == {"correct": False, "expert": "claim-window"}
    store.delete("a")
    assert list(store.items()) == ["b"] and not (tmp_path / "captures" / "images" / "a.png").exists()


@pytest.mark.parametrize("call", [
    lambda s: s.update("nope", label="calendar"),
    lambda s: s.delete("nope"),
    lambda s: s.update("a", expert="calendar"),  # the route is what happened: only feedback, label and reasons change
    lambda s: s.add(_item("../escape", 1.0), PNG),
])
def test_unknown_ids_fields_and_path_like_ids_are_refused(tmp_path, call):
    store = _store(tmp_path)
    store.add(_item("a", 1.0), PNG)
    with pytest.raises(CaptureError):
        call(store)
    assert not (tmp_path / "escape.png").exists()


def test_two_replicas_on_one_folder_share_one_store_and_a_second_capture_merges(tmp_path):
    a, b = _store(tmp_path), _store(tmp_path)
    a.add(_item("x", 1.0), PNG)
    b.add(_item("x", 2.0, reasons=("disagreement",)), PNG)
    b.add(_item("y", 3.0), PNG)
    assert list(a.items()) == ["x", "y"]
    assert a.get("x").reasons == ["random", "disagreement"] and a.get("x").captured_at == 1.0


def test_capture_is_off_by_default():
    assert CaptureConfig().dir is None and from_dict({}).capture_path is None


def _decision(expert: str = "calendar", confidence: float = 0.9) -> RouteDecision:
    return RouteDecision(expert=expert, confidence=confidence, probabilities={expert: confidence}, mode="choice",
                         latency_s=0.01, raw=expert, prompt_tokens=10, completion_tokens=1, router="router@1")


def _image() -> PreparedImage:
    return PreparedImage(data_url="data:image/png;base64," + base64.b64encode(PNG).decode(), width=1, height=1,
                         source="test")


def _capturer(tmp_path, on: bool = True, **settings) -> Capturer:
    return Capturer(CaptureConfig(dir="captures" if on else None, **settings), tmp_path / "captures" if on else None,
                    GatewayMetrics(), metric_label=lambda name: name, rng=random.Random(0))


def _feedback_counts(capturer: Capturer) -> dict[tuple, float]:
    return {tuple(sorted(s.labels.items())): s.value
            for f in text_string_to_metric_families(capturer.metrics.text().decode()) for s in f.samples
            if s.name == "lora_router_gateway_feedback_total"}


@pytest.mark.parametrize("settings, flagged, confidence, reasons", [
    ({}, False, 0.9, None),  # nothing asked for
    ({"fraction": 1.0}, False, 0.9, ["random"]),
    ({"below_confidence": 0.5}, False, 0.4, ["low_confidence"]),
    ({"below_confidence": 0.5}, False, 0.6, None),
    ({}, True, 0.9, ["flagged"]),
    ({"flagged": False}, True, 0.9, None),
    ({"fraction": 1.0, "below_confidence": 0.5}, True, 0.1, ["random", "low_confidence", "flagged"]),
])
async def test_what_is_captured_and_why(tmp_path, settings, flagged, confidence, reasons):
    capturer = _capturer(tmp_path, **settings)
    capturer.observe("r1", _image(), _decision(confidence=confidence), flagged=flagged)
    await capturer.close()
    item = capturer.store.get("r1")
    assert (item and item.reasons) == reasons
    if item:
        assert (item.expert, item.router, item.confidence) == ("calendar", "router@1", confidence)
        assert capturer.store.png(item) == PNG


async def test_a_shadow_disagreement_is_captured_unless_turned_off(tmp_path):
    on, off = _capturer(tmp_path / "on"), _capturer(tmp_path / "off", disagreements=False)
    for capturer in (on, off):
        capturer.observe("r1", _image(), _decision(), flagged=False)
        capturer.disagreement("r1")
        await capturer.close()
    assert on.store.get("r1").reasons == ["disagreement"] and off.store.get("r1") is None


async def test_feedback_on_a_wrong_route_captures_it_labelled_and_counts_it(tmp_path):
    capturer = _capturer(tmp_path)
    capturer.observe("r1", _image(), _decision("calendar"), flagged=False)
    answer = await capturer.feedback(Feedback("r1", correct=False, expert="claim-window"))
    assert answer == {"request_id": "r1", "router": "router@1", "routed": "calendar", "correct": False,
                      "label": "claim-window",
                      "captured": True}
    item = capturer.store.get("r1")
    assert item.reasons == ["feedback"] and item.label == "claim-window" and item.feedback["correct"] is False
    assert capturer.store.png(item) == PNG
    assert _feedback_counts(capturer) == {(("expert", "calendar"), ("verdict", "wrong")): 1.0}


async def test_feedback_that_a_route_was_right_labels_it_with_the_route(tmp_path):
    capturer = _capturer(tmp_path, fraction=1.0)
    capturer.observe("r1", _image(), _decision("calendar"), flagged=False)
    await capturer.close()
    await capturer.feedback(Feedback("r1", correct=True, expert=None))
    item = capturer.store.get("r1")
    assert (item.reasons, item.label) == (["random", "feedback"], "calendar")


async def test_with_capture_off_feedback_is_counted_and_nothing_is_stored(tmp_path):
    capturer = _capturer(tmp_path, on=False)
    capturer.observe("r1", _image(), _decision(), flagged=True)
    capturer.disagreement("r1")
    answer = await capturer.feedback(Feedback("r1", correct=False, expert="claim-window"))
    assert answer["captured"] is False and capturer.store is None
    assert not (tmp_path / "captures").exists()
    assert _feedback_counts(capturer) == {(("expert", "calendar"), ("verdict", "wrong")): 1.0}


async def test_feedback_past_the_recent_buffer_or_on_an_unknown_id_is_a_404(tmp_path):
    capturer = _capturer(tmp_path, recent=2)
    for n in range(3):
        capturer.observe(f"r{n}", _image(), _decision(), flagged=False)
    await capturer.feedback(Feedback("r1", correct=True, expert=None))  # still remembered
    for unknown in ("r0", "never-sent"):
        with pytest.raises(GatewayError) as caught:
            await capturer.feedback(Feedback(unknown, correct=True, expert=None))
        assert (caught.value.status, caught.value.code, caught.value.param) == (404, "unknown_request", "request_id")
        assert "gateway.capture.recent" in caught.value.message


@pytest.mark.parametrize("body, problems", [
    ({}, ["request_id must be", "correct must be"]),
    ({"request_id": "r1", "correct": "no"}, ["correct must be true or false"]),
    ({"request_id": "a b", "correct": False}, ["request_id must be"]),
    ({"request_id": "r1", "correct": False, "expert": "invoice"}, ["expert must be one of the router's labels"]),
    ({"request_id": "r1", "correct": True, "expert": "calendar"}, ["send it with correct false"]),
    ({"request_id": "r1", "correct": False, "why": "x"}, ["unknown field(s): why"]),
])
def test_bad_feedback_bodies_are_refused_naming_every_problem(body, problems):
    with pytest.raises(GatewayError) as caught:
        parse_feedback(body, EXPERTS)
    assert (caught.value.status, caught.value.code) == (400, "invalid_feedback")
    for problem in problems:
        assert problem in caught.value.message


def test_a_good_feedback_body():
    assert parse_feedback({"request_id": "r1", "correct": False, "expert": "calendar"}, EXPERTS) == \
        Feedback("r1", False, "calendar")


def test_concurrent_adds_from_threads_lose_nothing(tmp_path):
    store = _store(tmp_path)

    async def many():
        await asyncio.gather(*(asyncio.to_thread(store.add, _item(f"i{n}", float(n)), PNG) for n in range(40)))

    asyncio.run(many())
    assert len(store.items()) == 40


@pytest.mark.parametrize("tamper", [
    lambda cookie: cookie,  # as issued: valid
    lambda cookie: str(int(cookie.split(".")[0]) + 3600) + "." + cookie.split(".")[1],  # a later expiry
    lambda cookie: cookie[:-1] + ("0" if cookie[-1] != "0" else "1"),  # another signature
    lambda cookie: "",
])
def test_a_review_session_is_the_admin_key_s_signature_of_its_expiry(tmp_path, tamper):
    routes = ReviewRoutes("admin-key", _capturer(tmp_path), labels=lambda: EXPERTS)
    now = time.time()
    cookie = routes.session_cookie(now)
    tampered = tamper(cookie)
    assert routes._valid(tampered, now) is (tampered == cookie)
    assert not routes._valid(cookie, now + 13 * 3600)  # expired
    # Another replica with the same key accepts it; one with another key does not.
    assert ReviewRoutes("admin-key", _capturer(tmp_path), labels=lambda: EXPERTS)._valid(cookie, now)
    assert not ReviewRoutes("other-key", _capturer(tmp_path), labels=lambda: EXPERTS)._valid(cookie, now)
    assert routes.csrf_token(cookie) != routes.csrf_token(routes.session_cookie(now + 1))
