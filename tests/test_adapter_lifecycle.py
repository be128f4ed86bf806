"""The adapter lifecycle on a running deployment: real vLLM on the pre-trained tiny base, the trained 3- and 4-class
routers (the session fixture `routers`), and a steady load of `auto` requests throughout.

The scenario (the module fixture `scenario`) starts with three experts and the 3-class router, adds the chandra-ocr
expert, adds and removes a scratch expert while requests run on it, loads the 4-class router as a candidate,
shadows it on all traffic, promotes it, rolls back and forward again; then the router learns from traffic
(benchmarks.learning_loop): screenshots of a look it never saw through `auto`, capture, callers' feedback, a played
review, export, a router retrained from the live one on the captures (the loop's default warm start) loaded as a
candidate, shadowed, scored on the labelled captures, promoted (it must route the unseen look better by the issue's
margin and today's looks as well), and rolled back by the operator; then the deployment restarts. The tests check
what it recorded, then send bad admin calls to the restarted deployment, whose LoRA slots are all taken.

Experts are random non-zero stand-ins (training.random_adapter) on the pre-trained base: routing is what is under
test, and training four experts, even briefly, would cost minutes of a suite that must stay within 40 on 2 cores.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path

import aiohttp
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.learning_loop import LoopConfig, LoopTarget, run_loop
from lora_router.capture import CaptureStore, held_out
from lora_router.images import prepare_image
from lora_router.jsonl import read_jsonl
from lora_router.manifest import AdapterManifest
from serving.adapters import adapter_fingerprint
from serving.launcher import VLLMServer
from serving.probe import probe_image
from tests.conftest import FOUR, THREE, deployment, start_server
from training.random_adapter import make_random_adapter
from training.tasks import OCR_PROMPT, build_example

pytestmark = pytest.mark.integration

KEY, ADMIN = "service-key", "admin-key"
# Concurrent auto callers of the steady load; at least 4 must be in flight at every moment.
LOAD_WORKERS = 6
SHADOWED = 60
# Screens per class checked before and after rollback, and the most whose route may differ (bf16 rounding in
# different batches can flip a near-tie; a router version decides the rest the same way every time).
CHECKED, FLIPS = 10, 1
# The learning loop: its traffic per class, the most labelled captures, fresh screenshots per class before and after.
LOOP_PER_CLASS, LOOP_LABELLED, LOOP_TEST_PER_CLASS = 60, 240, 60
# Issue 25's bars: the gain on the unseen look, today's looks after the promotion, and the goal (reported).
LOOP_GAIN, LOOP_IN_DISTRIBUTION, LOOP_GOAL = 0.15, 0.95, 0.90
# Standard errors a measured accuracy may fall short of what it is tested against: the tiny routers' own accuracy on
# today's looks is 0.95-0.97, so on a few hundred screenshots sampling alone puts 0.95 within one standard error.
LOOP_SIGMAS = 2


@pytest.fixture(scope="module")
def experts_dir(pretrained_base, tmp_path_factory) -> Path:
    """An adapter folder: stand-in experts for the four tasks and a scratch one, plus adapters the admin API must
    refuse (DoRA, rank 32, a router naming an expert never loaded), all on the pre-trained base."""
    root = tmp_path_factory.mktemp("adapters")
    base = str(pretrained_base)
    for seed, name in enumerate((*FOUR, "scratch", "tables"), start=21):
        make_random_adapter(base, root / name, seed=seed, b_std=0.2)
    make_random_adapter(base, root / "dora", use_dora=True)
    make_random_adapter(base, root / "rank32", rank=32)
    make_random_adapter(base, root / "router5", labels=[*FOUR, "invoice"], rank=16)
    (root / "empty").mkdir()
    return root


def _config(experts_dir: Path, routers: dict, pretrained_base: Path, state: Path, **engine):
    return deployment(
        experts_dir, model={"path": str(pretrained_base), "served_name": "base"},
        router={"name": "router", "path": str(routers[3]["adapter"])},
        experts=[{"name": n, "path": str(experts_dir / n), "prompt": f"Do the {n} task."} for n in THREE],
        # Slots: the router, 3 experts, chandra-ocr, the candidate and the previous router, the loop's candidate.
        engine={"port": 0, "kv_cache_gib": 1, "api_key": KEY, "max_lora_rank": 16, "lora_headroom": 3,
                "tower_lora": True, **engine},
        gateway={"admin_api_key": ADMIN, "adapter_dirs": [str(experts_dir), str(routers["root"])],
                 "shadow_fraction": 1.0, "state_file": str(state),
                 "capture": {"dir": str(state.parent / "captures"), "fraction": 0.5, "recent": 512}},
        # Choice: every route names a label, whatever the router answers.
        client={"router_mode": "choice"})


def _url(image: Image.Image | Path) -> str:
    return prepare_image(Image.open(image) if isinstance(image, Path) else image).data_url


def _auto(url: str, max_tokens: int = 4) -> dict:
    return {"model": "auto", "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}


class SteadyLoad:
    """LOAD_WORKERS callers, each sending the next auto request as soon as its last one is answered."""

    def __init__(self, session: aiohttp.ClientSession, server: VLLMServer, urls: list[str]) -> None:
        self.session, self.server, self.urls = session, server, urls
        self.sent = 0
        self.answers: list[tuple[int | str, str | None]] = []
        self.in_flight = 0
        self.fewest_in_flight = math.inf
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._caller(i)) for i in range(LOAD_WORKERS)]
        self._tasks.append(asyncio.create_task(self._watch()))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _caller(self, i: int) -> None:
        n = i
        while not self._stop.is_set():
            self.sent += 1
            self.in_flight += 1
            try:
                async with self.session.post(self.server.base_url + "/chat/completions",
                                             json=_auto(self.urls[n % len(self.urls)]), headers=self.server.headers) as r:
                    await r.read()
                    self.answers.append((r.status, r.headers.get("x-route-expert")))
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                self.answers.append((repr(exc), None))
            finally:
                self.in_flight -= 1
            n += LOAD_WORKERS

    async def _watch(self) -> None:
        while not self._stop.is_set():
            self.fewest_in_flight = min(self.fewest_in_flight, self.in_flight)
            await asyncio.sleep(0.05)


async def _admin(session, server, method: str, path: str, body: dict | None = None,
                 headers: dict | None = None) -> tuple[int, dict]:
    async with session.request(method, server.root_url + path, json=body,
                               headers={"Authorization": f"Bearer {ADMIN}"} if headers is None else headers) as r:
        return r.status, await r.json()


async def _routes(session, server, urls: list[str]) -> list[str]:
    """Where the gateway routes each screenshot now (all sent at once, beside the load)."""
    async def one(url: str) -> str:
        async with session.post(server.base_url + "/chat/completions", json=_auto(url, 1), headers=server.headers) as r:
            assert r.status == 200, await r.text()
            return r.headers["x-route-expert"]
    return list(await asyncio.gather(*(one(u) for u in urls)))


async def _model_ids(session, server) -> set[str]:
    async with session.get(server.base_url + "/models", headers=server.headers) as r:
        return {m["id"] for m in (await r.json())["data"]}


async def _metrics(session, server) -> dict[tuple, float]:
    async with session.get(server.root_url + "/metrics") as r:
        text = await r.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _screens(predictions: Path, classes: tuple[str, ...], per_class: int | None = None) -> list[dict]:
    """Held-out screenshots of the validation CLI's run (gold label, its prediction, the image), by class."""
    lines = read_jsonl(predictions)
    return [line for c in classes for line in [x for x in lines if x["gold"] == c][:per_class]]


async def _run_scenario(server: VLLMServer, experts_dir: Path, routers: dict, record: dict) -> None:
    load_urls = [_url(build_example(kind, 7000 + i).image) for kind in FOUR for i in range(6)]
    docs = _screens(routers[4]["predictions"], ("chandra-ocr",))
    doc_urls = [_url(Path(d["image"])) for d in docs]
    three_urls = [_url(Path(s["image"])) for s in _screens(routers[3]["predictions"], THREE, CHECKED)]
    record["docs_cli"] = [d["predicted"] for d in docs]
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        load = SteadyLoad(session, server, load_urls)
        load.start()
        while load.sent < 2 * LOAD_WORKERS:
            await asyncio.sleep(0.1)
        record["start_state"] = (await _admin(session, server, "GET", "/admin/state"))[1]
        record["docs_before"] = await _routes(session, server, doc_urls)
        record["three_before"] = await _routes(session, server, three_urls)

        record["add"] = await _admin(session, server, "POST", "/admin/adapters", {
            "name": "chandra-ocr", "path": str(experts_dir / "chandra-ocr"), "prompt": OCR_PROMPT})
        record["models_after_add"] = await _model_ids(session, server)
        async with session.post(server.base_url + "/chat/completions", headers=server.headers, json={
                "model": "chandra-ocr", "max_tokens": 4, "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": doc_urls[0]}}]}]}) as r:
            record["named_chandra"] = r.status

        record["scratch"] = await _drain_scratch(session, server, experts_dir)

        record["candidate"] = await _admin(session, server, "POST", "/admin/router/candidate",
                                           {"path": str(routers[4]["adapter"])})
        deadline = time.monotonic() + 600
        while (await _admin(session, server, "GET", "/admin/router/shadow"))[1]["compared"] < SHADOWED:
            assert time.monotonic() < deadline, "shadow traffic stalled"
            await asyncio.sleep(1)
        record["metrics"] = await _metrics(session, server)
        record["shadow"] = (await _admin(session, server, "GET", "/admin/router/shadow"))[1]

        record["promote"] = await _admin(session, server, "POST", "/admin/router/promote")
        record["docs_promoted"] = await _routes(session, server, doc_urls)
        record["rollback"] = await _admin(session, server, "POST", "/admin/router/rollback")
        record["docs_rolled_back"] = await _routes(session, server, doc_urls)
        record["three_rolled_back"] = await _routes(session, server, three_urls)
        record["roll_forward"] = await _admin(session, server, "POST", "/admin/router/rollback")
        await load.stop()
    record["load"] = {"sent": load.sent, "answers": load.answers, "fewest_in_flight": load.fewest_in_flight}


async def _learning_loop(server: VLLMServer, experts_dir: Path, routers: dict, work: Path, record: dict):
    """The loop on the 4-class router, live by now; then the operator rolls the retrained router back."""
    folder = experts_dir / "loop"
    folder.mkdir()
    settings = LoopConfig(family="classic", traffic_per_class=LOOP_PER_CLASS, labelled=LOOP_LABELLED,
                          test_per_class=LOOP_TEST_PER_CLASS, recipe="tower")
    metrics = await run_loop(LoopTarget.of(server.config, server.base_url, folder), routers[4]["data"], settings, work)
    async with aiohttp.ClientSession() as session:
        record["loop_promoted"] = (await _admin(session, server, "GET", "/admin/state"))[1]
        record["loop_rollback"] = await _admin(session, server, "POST", "/admin/router/rollback")
        record["end_state"] = (await _admin(session, server, "GET", "/admin/state"))[1]
    record["loop_folder"] = folder
    return metrics


async def _drain_scratch(session, server: VLLMServer, experts_dir: Path) -> dict:
    """Add a scratch expert, start requests on it, remove it while they run: they finish, later ones are refused."""
    added = await _admin(session, server, "POST", "/admin/adapters", {"name": "scratch",
                                                                     "path": str(experts_dir / "scratch")})
    served = server.gateway.names.served("scratch")
    body = {"model": "scratch", "max_tokens": 200, "temperature": 0, "ignore_eos": True, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": probe_image(seed=5)}}]}]}

    async def one() -> int:
        async with session.post(server.base_url + "/chat/completions", json=body, headers=server.headers) as r:
            await r.read()
            return r.status

    running = [asyncio.create_task(one()) for _ in range(4)]
    deadline = time.monotonic() + 60
    while server.gateway.names.in_flight(served) < 4:
        assert time.monotonic() < deadline, "the requests on the scratch expert never ran"
        await asyncio.sleep(0.01)
    removed = await _admin(session, server, "DELETE", "/admin/adapters/scratch")
    in_flight_answers = await asyncio.gather(*running)
    return {"added": added, "removed": removed, "in_flight_answers": in_flight_answers, "after": await one(),
            "models": await _model_ids(session, server)}


@pytest.fixture(scope="module")
def scenario(experts_dir, routers, pretrained_base, tmp_path_factory) -> dict:
    """Runs the scenario once; yields what it recorded, with the restarted server (every LoRA slot taken)."""
    logs = tmp_path_factory.mktemp("logs")
    state = tmp_path_factory.mktemp("state") / "deployment.state.json"
    record: dict = {"state_file": state}
    started = time.perf_counter()
    server = start_server(_config(experts_dir, routers, pretrained_base, state), logs / "vllm.log")
    try:
        record["start_s"] = time.perf_counter() - started
        asyncio.run(_run_scenario(server, experts_dir, routers, record))
        record["scenario_s"] = time.perf_counter() - started
        record["loop"] = asyncio.run(_learning_loop(server, experts_dir, routers, tmp_path_factory.mktemp("loop"),
                                                    record))
    finally:
        server.stop()
    # The restart sets max_loras to what is served, so the bad calls below find every slot taken.
    config = _config(experts_dir, routers, pretrained_base, state, max_loras=6)
    started = time.perf_counter()
    restarted = start_server(config, logs / "vllm-restarted.log", probe=False)
    record["restart_s"] = time.perf_counter() - started
    record["restarted"] = restarted
    yield record
    restarted.stop()


def test_start_serves_three_experts_and_the_3_class_router_with_headroom(scenario, routers):
    start = scenario["start_state"]
    assert start["router"]["version"] == adapter_fingerprint(routers[3]["adapter"])
    assert start["router"]["served_as"] == f"router@{start['router']['version']}"
    assert [e["name"] for e in start["experts"]] == list(THREE)
    assert start["slots"] == {"used": 4, "total": 7}  # router + 3 experts + engine.lora_headroom
    assert "chandra-ocr" not in scenario["docs_before"], "the 3-class router cannot name chandra-ocr"


def test_the_steady_load_had_no_failed_and_no_lost_request(scenario):
    load = scenario["load"]
    statuses = [status for status, _ in load["answers"]]
    print(f"\nsteady load: {load['sent']} auto requests, {statuses.count(200)} answered 200, at least "
          f"{load['fewest_in_flight']} in flight; start {scenario['start_s']:.0f} s, whole scenario "
          f"{scenario['scenario_s']:.0f} s, restart {scenario['restart_s']:.0f} s")
    assert len(load["answers"]) == load["sent"], "requests lost"
    assert statuses.count(200) == len(statuses), [s for s in statuses if s != 200][:5]
    assert load["fewest_in_flight"] >= 4
    assert load["sent"] >= SHADOWED


def test_an_added_expert_is_listed_and_answers_by_name(scenario):
    status, added = scenario["add"]
    assert status == 200, added
    assert added["added"]["name"] == "chandra-ocr" and added["added"]["served_as"].startswith("chandra-ocr@")
    assert added["slots"] == {"used": 5, "total": 7}
    assert {"auto", "base", "router", *FOUR} <= scenario["models_after_add"]
    assert not any("@" in m for m in scenario["models_after_add"]), "versioned names are vLLM's own"
    assert scenario["named_chandra"] == 200


def test_a_removed_expert_finishes_its_requests_first_and_is_gone_after(scenario):
    scratch = scenario["scratch"]
    status, added = scratch["added"]
    assert status == 200, added
    status, removed = scratch["removed"]
    assert status == 200 and removed["drained"] is True, removed
    assert scratch["in_flight_answers"] == [200] * 4
    assert scratch["after"] == 404 and "scratch" not in scratch["models"]


def test_the_candidate_was_shadowed_and_compared_with_the_live_router(scenario, routers):
    status, candidate = scenario["candidate"]
    assert status == 200, candidate
    assert candidate["candidate"]["labels"] == list(FOUR)
    shadow = scenario["shadow"]
    print(f"\nshadow: {json.dumps(shadow)}")
    assert shadow["compared"] >= SHADOWED and shadow["failed"] == 0 and shadow["fraction"] == 1.0
    assert shadow["candidate"] == candidate["candidate"]["served_as"]
    confusion = shadow["confusion"]
    assert sum(sum(row.values()) for row in confusion.values()) == shadow["compared"]
    assert sum(row.get(live, 0) for live, row in confusion.items()) == shadow["agreed"]
    assert set(confusion) <= set(THREE), "the live router names only its own three experts"
    assert sum(row.get("chandra-ocr", 0) for row in confusion.values()) > 0, "the candidate sent no document to OCR"
    assert sum(shadow["confidence"]["counts"]) == shadow["compared"]
    # /metrics counts the same things (one scrape, taken just before the report).
    metrics = scenario["metrics"]
    label = (("candidate", shadow["candidate"]),)
    compared = metrics[("lora_router_gateway_shadow_compared_total", label)]
    assert SHADOWED <= compared <= shadow["compared"]
    routes = sum(v for (name, labels), v in metrics.items() if name == "lora_router_gateway_shadow_routes_total"
                 and dict(labels)["candidate"] == shadow["candidate"])
    assert routes == compared == metrics[("lora_router_gateway_shadow_confidence_count", label)]


def test_after_promotion_documents_route_to_ocr_as_the_validation_cli_says(scenario, routers):
    status, promoted = scenario["promote"]
    assert status == 200, promoted
    assert promoted["router"]["labels"] == list(FOUR) and promoted["previous_router"]["labels"] == list(THREE)
    routed, cli = scenario["docs_promoted"], scenario["docs_cli"]
    served_recall = routed.count("chandra-ocr") / len(routed)
    cli_recall = routers[4]["in_process"]["per_class"]["chandra-ocr"]["recall"]
    print(f"\ndocuments routed to chandra-ocr: {served_recall:.3f} through the gateway, {cli_recall:.3f} by the "
          f"validation CLI ({len(routed)} held-out screens)")
    assert sum(a != b for a, b in zip(routed, cli)) <= FLIPS, list(zip(routed, cli))
    assert abs(served_recall - cli_recall) <= FLIPS / len(routed) + 1e-9


def test_rollback_restores_the_3_class_routing(scenario):
    status, rolled = scenario["rollback"]
    assert status == 200, rolled
    assert rolled["router"]["labels"] == list(THREE)
    assert "chandra-ocr" not in scenario["docs_rolled_back"]
    for before, after in (("docs_before", "docs_rolled_back"), ("three_before", "three_rolled_back")):
        differ = sum(a != b for a, b in zip(scenario[before], scenario[after]))
        assert differ <= FLIPS, (scenario[before], scenario[after])
    status, forward = scenario["roll_forward"]  # rolling back twice goes back to the promoted version
    assert status == 200 and forward["router"]["labels"] == list(FOUR)


def test_every_request_of_the_learning_loop_was_answered(scenario):
    metrics = scenario["loop"]
    print(f"\nlearning loop: {json.dumps(metrics.labelled)} labelled, accuracy on classic "
          f"{metrics.family_before} -> {metrics.family_after}, today's looks {metrics.in_distribution_before} -> "
          f"{metrics.in_distribution_after}; {metrics.requests} requests, stages {metrics.stages_s}")
    assert metrics.failed == []
    # The traffic, then each fresh set routed before the promotion and again after it.
    assert metrics.latency.count == len(FOUR) * (LOOP_PER_CLASS + 4 * LOOP_TEST_PER_CLASS)
    assert metrics.requests > metrics.latency.count  # feedback and admin calls too


def test_feedback_on_wrong_routes_and_review_label_the_exported_captures(scenario):
    metrics = scenario["loop"]
    wrong = round((1 - metrics.traffic_accuracy) * len(FOUR) * LOOP_PER_CLASS)
    assert metrics.labelled["feedback"] == min(wrong, LOOP_LABELLED)
    folder = scenario["restarted"].config.capture_path
    labelled = [i for i in CaptureStore(folder, max_items=1 << 62, max_age_s=float("inf"),
                                        max_bytes=1 << 62).items().values() if i.label is not None]
    assert len(labelled) == sum(metrics.labelled.values()) <= LOOP_LABELLED
    assert sum(1 for i in labelled if "feedback" in i.reasons) == metrics.labelled["feedback"]
    assert {i.label for i in labelled} <= set(FOUR)
    exported = {split: sum(counts.values()) for split, counts in metrics.exported.items() if split != "unlabelled"}
    assert exported == {"train": sum(1 for i in labelled if not held_out(i.id)),
                        "eval": sum(1 for i in labelled if held_out(i.id))}


def test_the_promoted_router_routes_the_unseen_look_better_and_today_s_looks_as_well(scenario):
    metrics = scenario["loop"]
    assert sum(metrics.labelled.values()) <= LOOP_LABELLED
    assert metrics.family_after - metrics.family_before >= LOOP_GAIN, (metrics.family_before, metrics.family_after)
    # Today's looks: the promoted router is consistent with the bar on this many screenshots, and loses no more of
    # the very screenshots the live router got right than it wins back, beyond chance (discordant pairs, McNemar).
    count = len(FOUR) * LOOP_TEST_PER_CLASS
    floor = LOOP_IN_DISTRIBUTION - LOOP_SIGMAS * math.sqrt(LOOP_IN_DISTRIBUTION * (1 - LOOP_IN_DISTRIBUTION) / count)
    assert metrics.in_distribution_after >= floor, (metrics.in_distribution_after, floor)
    lost, won = metrics.in_distribution_flips["lost"], metrics.in_distribution_flips["won"]
    assert lost - won <= LOOP_SIGMAS * math.sqrt(lost + won), metrics.in_distribution_flips
    print(f"\nclassic after the loop {metrics.family_after:.3f} (goal {LOOP_GOAL}), retrained in {metrics.train_s} s; "
          f"today's looks {metrics.in_distribution_before} -> {metrics.in_distribution_after} (bar "
          f"{LOOP_IN_DISTRIBUTION}, floor {floor:.3f} on {count}), {lost} lost, {won} won")


def test_the_retrained_router_was_shadowed_scored_on_the_captures_and_promoted(scenario):
    metrics, promoted = scenario["loop"], scenario["loop_promoted"]
    shadow = metrics.shadow
    assert shadow["candidate"] == metrics.candidate and shadow["failed"] == 0
    assert shadow["compared"] + shadow["skipped"] == 2 * len(FOUR) * LOOP_TEST_PER_CLASS
    scored = shadow["labelled"]
    assert scored["failed"] == 0 and scored["scored"] == scored["count"] == sum(metrics.exported["eval"].values())
    assert promoted["router"]["served_as"] == metrics.candidate
    manifest = AdapterManifest.read(promoted["router"]["path"])
    assert manifest.labels == list(FOUR) and manifest.vision_tower  # the tower recipe's
    status, rolled = scenario["loop_rollback"]
    assert status == 200 and rolled["live"]["served_as"] == promoted["previous_router"]["served_as"]


def test_a_restart_after_promotion_comes_back_with_the_4_class_router_live(scenario, routers):
    restarted: VLLMServer = scenario["restarted"]
    before = scenario["end_state"]

    async def after() -> tuple[dict, list[str]]:
        async with aiohttp.ClientSession() as session:
            state = (await _admin(session, restarted, "GET", "/admin/state"))[1]
            docs = _screens(routers[4]["predictions"], ("chandra-ocr",))[:CHECKED]
            return state, await _routes(session, restarted, [_url(Path(d["image"])) for d in docs])

    state, docs = asyncio.run(after())
    for key in ("router", "previous_router", "experts"):
        assert state[key] == before[key], key
    assert state["router"]["version"] == adapter_fingerprint(routers[4]["adapter"])
    assert state["slots"] == {"used": 6, "total": 6}
    assert docs.count("chandra-ocr") >= len(docs) - FLIPS


def _snapshot(server: VLLMServer, state_file: Path) -> tuple:
    async def read():
        async with aiohttp.ClientSession() as session:
            return (await _model_ids(session, server), (await _admin(session, server, "GET", "/admin/state"))[1])
    models, state = asyncio.run(read())
    return models, state, state_file.read_bytes()


BAD_CALLS = [
    # (case, method, path, body with {adapters}/{outside} placeholders, who calls, status, words in the message)
    ("no admin key", "POST", "/admin/adapters", {"name": "tables", "path": "{adapters}/tables"}, "nobody", 401,
     "no admin key"),
    ("the service key as admin key", "POST", "/admin/adapters", {"name": "tables", "path": "{adapters}/tables"},
     "service", 401, "wrong admin key"),
    ("wrong admin key", "POST", "/admin/router/promote", None, "wrong", 401, "wrong admin key"),
    ("a path outside the adapter folders", "POST", "/admin/adapters", {"name": "tables", "path": "{outside}/tables"},
     "admin", 403, "not inside an adapter folder"),
    ("a path through ..", "POST", "/admin/adapters", {"name": "tables", "path": "{adapters}/../x/tables"}, "admin",
     403, "'..'"),
    ("a folder that is no adapter", "POST", "/admin/adapters", {"name": "tables", "path": "{adapters}/empty"},
     "admin", 400, "no adapter_config.json"),
    ("a DoRA adapter", "POST", "/admin/adapters", {"name": "tables", "path": "{adapters}/dora"}, "admin", 400,
     "DoRA adapters"),
    ("a rank over the limit", "POST", "/admin/adapters", {"name": "tables", "path": "{adapters}/rank32"}, "admin",
     400, "rank 32 is above engine.max_lora_rank=16"),
    ("a router naming an expert that is not loaded", "POST", "/admin/router/candidate",
     {"path": "{adapters}/router5"}, "admin", 400, "router labels ['invoice'] name no loaded expert"),
    ("every LoRA slot taken", "POST", "/admin/adapters", {"name": "tables", "path": "{adapters}/tables"}, "admin",
     409, "all 6 LoRA slots are taken"),
    ("a name already served", "POST", "/admin/adapters", {"name": "calendar", "path": "{adapters}/tables"}, "admin",
     409, "'calendar' is a loaded expert already"),
    ("removing an expert the live router routes to", "DELETE", "/admin/adapters/chandra-ocr", None, "admin", 409,
     "label of the live router"),
    ("promoting with no candidate", "POST", "/admin/router/promote", None, "admin", 409, "no candidate router"),
    ("vLLM's own adapter loading through the service", "POST", "/v1/load_lora_adapter",
     {"lora_name": "tables", "lora_path": "{adapters}/tables"}, "service", 404, "admin API"),
]


@pytest.mark.parametrize("case, method, path, body, caller, status, words", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_admin_calls_are_refused_and_change_nothing(scenario, experts_dir, tmp_path, case, method, path, body,
                                                        caller, status, words):
    server: VLLMServer = scenario["restarted"]
    outside = tmp_path / "outside"
    if "{outside}" in str(body):
        make_random_adapter(str(server.model_path), outside / "tables", seed=3)  # a good adapter, in the wrong place
    if body is not None:
        body = {k: v.format(adapters=experts_dir, outside=outside) for k, v in body.items()}
    headers = {"nobody": {}, "service": server.headers, "wrong": {"Authorization": "Bearer nope"},
               "admin": {"Authorization": f"Bearer {ADMIN}"}}[caller]
    before = _snapshot(server, scenario["state_file"])

    async def call():
        async with aiohttp.ClientSession() as session:
            return await _admin(session, server, method, path, body, headers)

    got, answer = asyncio.run(call())
    assert got == status, answer
    assert set(answer["error"]) >= {"message", "type", "param", "code"}
    assert words in answer["error"]["message"], answer
    assert _snapshot(server, scenario["state_file"]) == before


def test_without_an_admin_key_the_admin_api_and_runtime_loading_are_off(served):
    async def calls():
        async with aiohttp.ClientSession(headers=served.headers) as session:
            admin = await _admin(session, served, "POST", "/admin/adapters", {"name": "x", "path": "checkpoints/x"},
                                 headers=served.headers)
            direct = await _admin(session, served, "POST", "/v1/load_lora_adapter",
                                  {"lora_name": "x", "lora_path": "/tmp"}, headers=served.headers)
            return admin, direct

    (status, answer), (direct_status, direct) = asyncio.run(calls())
    assert status == 404 and "the admin API is off" in answer["error"]["message"]
    assert direct_status == 404 and "admin API" in direct["error"]["message"]
    assert not served.config.gateway.admin_enabled
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in served.command.env
