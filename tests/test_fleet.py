"""Two replicas (each gateway + its own vLLM) behind the shipped Caddy balancer, sharing one desired state, under a
steady `auto` load from start to end.

The scenario (the module fixture `fleet`): through replica A, add chandra-ocr, load a 4-class candidate router,
shadow it and promote it, while replica B follows the state file; send two conflicting admin calls to A and B at
once; SIGKILL B's vLLM and watch the balancer take it out and back in; then stop both and start both. The tests
check what it recorded. Adapters are random non-zero stand-ins on the random tiny model: what is under test is
where requests go and what each replica serves, not what the adapters answer.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from lora_router.images import prepare_image
from serving.adapters import adapter_fingerprint
from serving.balancer import Balancer
from serving.launcher import VLLMServer, free_port
from tests.conftest import EXPERTS, FOUR, deployment, start_server
from training.random_adapter import make_random_adapter
from training.tasks import build_example

pytestmark = pytest.mark.integration

KEY, ADMIN = "fleet-key", "fleet-admin"
SYNC_S = 1.0
LOAD_WORKERS = 6


@pytest.fixture(scope="module")
def fleet_adapters(tiny_model_dir, tmp_path_factory) -> Path:
    """The three experts and router of the deployment, chandra-ocr, a 4-class router, and two different 'tables'
    experts for the conflicting calls; strong enough that no probe mistakes one for the base model."""
    root = tmp_path_factory.mktemp("fleet-adapters")
    base = str(tiny_model_dir)
    make_random_adapter(base, root / "router", labels=list(EXPERTS), seed=31, b_std=0.2)
    make_random_adapter(base, root / "router4", labels=list(FOUR), seed=32, b_std=0.2)
    for seed, name in enumerate((*FOUR, "tables-a", "tables-b"), start=33):
        make_random_adapter(base, root / name, seed=seed, b_std=0.2)
    return root


def _config(adapters: Path, state: Path):
    return deployment(
        adapters, router={"name": "router", "path": str(adapters / "router")},
        # Slots for the router, 3 experts, then chandra-ocr, the candidate (kept as the previous router) and tables.
        engine={"port": 0, "kv_cache_gib": 1, "api_key": KEY, "cpu_threads": 1, "lora_headroom": 3},
        gateway={"admin_api_key": ADMIN, "adapter_dirs": [str(adapters)], "shadow_fraction": 1.0,
                 "state_file": str(state), "sync_interval_s": SYNC_S},
        client={"router_mode": "choice"})


def _start_both(config, logs: Path, tag: str) -> tuple[VLLMServer, VLLMServer]:
    """Replicas A and B of one config, started side by side."""
    servers: dict[str, VLLMServer] = {}
    errors: list[BaseException] = []

    def start(name: str) -> None:
        try:
            servers[name] = start_server(config, logs / f"vllm-{name}-{tag}.log", probe=False)
        except BaseException as exc:  # reported below, after both threads ended
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(name,)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        for server in servers.values():
            server.stop()
        raise errors[0]
    return servers["a"], servers["b"]


def _auto(url: str) -> dict:
    return {"model": "auto", "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}


class Load:
    """LOAD_WORKERS callers through the balancer, each sending its next auto request when the last is answered;
    records (start, seconds, status, replica port) per request."""

    def __init__(self, session: aiohttp.ClientSession, url: str, urls: list[str]) -> None:
        self.session, self.url, self.urls = session, url, urls
        self.sent = 0
        self.results: list[tuple[float, float, int | str, int | None]] = []
        self.in_flight = 0
        self.fewest_in_flight = math.inf
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._caller(i)) for i in range(LOAD_WORKERS)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _caller(self, i: int) -> None:
        n = i
        while not self._stop.is_set():
            self.sent += 1
            self.in_flight += 1
            started = time.monotonic()
            try:
                async with self.session.post(self.url + "/v1/chat/completions", json=_auto(self.urls[n % len(self.urls)]),
                                             headers={"Authorization": f"Bearer {KEY}"}) as r:
                    await r.read()
                    replica = r.headers.get("X-Replica", ":").rpartition(":")[2]
                    outcome: int | str = r.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                outcome, replica = repr(exc), ""
            finally:
                if len(self.results) >= LOAD_WORKERS and not self._stop.is_set():  # while every caller runs
                    self.fewest_in_flight = min(self.fewest_in_flight, self.in_flight)
                self.in_flight -= 1
            self.results.append((started, time.monotonic() - started, outcome, int(replica) if replica else None))
            n += LOAD_WORKERS

    def failed(self, since: float = 0.0, until: float = math.inf) -> list:
        return [r for r in self.results if since <= r[0] < until and r[2] != 200]


async def _admin(session, server: VLLMServer, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    async with session.request(method, server.root_url + path, json=body,
                               headers={"Authorization": f"Bearer {ADMIN}"}) as r:
        return r.status, await r.json()


async def _wait(condition, what: str, deadline_s: float = 180.0) -> float:
    """Seconds until the async `condition()` holds; fails naming `what` past the deadline."""
    start = time.monotonic()
    while not await condition():
        assert time.monotonic() - start < deadline_s, f"waited {deadline_s:g} s for {what}"
        await asyncio.sleep(0.1)
    return time.monotonic() - start


async def _scenario(a: VLLMServer, b: VLLMServer, adapters: Path, balancer: Balancer, record: dict) -> None:
    urls = [prepare_image(build_example(kind, 8100 + i).image).data_url for kind in FOUR for i in range(3)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        load = Load(session, balancer.url, urls)
        load.start()
        await _wait(lambda: _true(len(load.results) >= 2 * LOAD_WORKERS), "the load to run")
        record["start_state"] = {name: (await _admin(session, s, "GET", "/admin/state"))[1]
                                 for name, s in (("a", a), ("b", b))}

        # Add an expert through A; B loads it from the shared state.
        started = time.monotonic()
        record["add"] = await _admin(session, a, "POST", "/admin/adapters",
                                     {"name": "chandra-ocr", "path": str(adapters / "chandra-ocr"), "prompt": "Read."})
        record["add_s"] = time.monotonic() - started
        record["add_converge_s"] = await _wait(lambda: _has_expert(session, b, "chandra-ocr"), "B to add chandra-ocr")
        async with session.post(b.base_url + "/chat/completions", headers=b.headers, json={
                "model": "chandra-ocr", "max_tokens": 2, "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": urls[0]}}]}]}) as r:
            record["chandra_on_b"] = r.status

        # A candidate router through A: B loads and shadows it too; promote through A: B routes with it.
        record["candidate"] = await _admin(session, a, "POST", "/admin/router/candidate",
                                           {"path": str(adapters / "router4")})
        await _wait(lambda: _shadowed(session, b), "B to shadow the candidate")
        record["shadow_b"] = (await _admin(session, b, "GET", "/admin/router/shadow"))[1]
        started = time.monotonic()
        record["promote"] = await _admin(session, a, "POST", "/admin/router/promote")
        record["promote_s"] = time.monotonic() - started
        new_router = record["candidate"][1]["candidate"]["served_as"]
        record["promote_converge_s"] = await _wait(lambda: _routes_with(session, b, urls[1], new_router),
                                                   "B to route with the promoted router")

        # Two conflicting calls at once: the same name, two different adapters, on A and on B.
        record["conflict"] = await asyncio.gather(*(
            _admin(session, server, "POST", "/admin/adapters", {"name": "tables", "path": str(adapters / folder)})
            for server, folder in ((a, "tables-a"), (b, "tables-b"))))
        await _wait(lambda: _same_state(session, a, b), "A and B to serve one state")
        record["after_admin"] = {name: (await _admin(session, s, "GET", "/admin/state"))[1]
                                 for name, s in (("a", a), ("b", b))}
        record["admin_failed"] = load.failed()
        record["admin_sent"] = len(load.results)

        # B's vLLM dies under load: the balancer takes B out, then back in once its vLLM is restarted and warm.
        killed, killed_at = time.monotonic(), time.time()
        b.kill_vllm()
        await _wait(lambda: _true(b.gateway.ready and b.restarts >= 1), "B's vLLM to be restarted", 300)
        ready, ready_at = time.monotonic(), time.time()
        await _wait(lambda: _true(any(r[0] >= ready and r[3] == b.port for r in load.results)), "B to take traffic")
        host = f"127.0.0.1:{b.port}"
        ejected = balancer.marked(host, up=False, after=killed_at)
        back = balancer.marked(host, up=True, after=killed_at)  # B was down from the kill on
        record["failover"] = {"eject_s": ejected - killed_at if ejected else math.inf, "restart_s": ready - killed,
                              "rejoin_s": max(back - ready_at, 0.0) if back else math.inf, "failed": load.failed(killed),
                              "slowest_s": max(r[1] for r in load.results if r[0] >= killed - 5)}
        await load.stop()
        record["load"] = {"sent": load.sent, "answered": len(load.results), "fewest_in_flight": load.fewest_in_flight,
                          "failed": load.failed(), "b_port": b.port}
        record["end_state"] = (await _admin(session, a, "GET", "/admin/state"))[1]


async def _true(value: bool) -> bool:
    return value


async def _has_expert(session, server: VLLMServer, name: str) -> bool:
    state = (await _admin(session, server, "GET", "/admin/state"))[1]
    return any(e["name"] == name for e in state["experts"])


async def _shadowed(session, server: VLLMServer) -> bool:
    return (await _admin(session, server, "GET", "/admin/router/shadow"))[1]["compared"] > 0


async def _routes_with(session, server: VLLMServer, url: str, router: str) -> bool:
    async with session.post(server.base_url + "/chat/completions", json=_auto(url), headers=server.headers) as r:
        body = await r.json()
        return r.status == 200 and body["routing"]["router"] == router and r.headers["x-route-router"] == router


def _served(state: dict) -> tuple:
    """What a replica serves, as its admin state shows it (not where or since when)."""
    version = lambda a: a and a["served_as"]
    return (state["state_version"], version(state["router"]), version(state["previous_router"]),
            version(state["candidate"]), tuple(version(e) for e in state["experts"]))


async def _same_state(session, a: VLLMServer, b: VLLMServer) -> bool:
    states = [(await _admin(session, s, "GET", "/admin/state"))[1] for s in (a, b)]
    return _served(states[0]) == _served(states[1])


@pytest.fixture(scope="module")
def fleet(fleet_adapters, tmp_path_factory) -> dict:
    logs = tmp_path_factory.mktemp("fleet-logs")
    config = _config(fleet_adapters, tmp_path_factory.mktemp("fleet-state") / "fleet.state.json")
    record: dict = {}
    a, b = _start_both(config, logs, "first")
    balancer = Balancer([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"], f"127.0.0.1:{free_port()}",
                        logs / "caddy.log")
    try:
        with balancer:
            asyncio.run(_scenario(a, b, fleet_adapters, balancer, record))
    finally:
        a.stop()
        b.stop()
    a, b = _start_both(config, logs, "again")

    async def states() -> dict:
        async with aiohttp.ClientSession() as session:
            return {name: (await _admin(session, s, "GET", "/admin/state"))[1] for name, s in (("a", a), ("b", b))}

    try:
        record["restarted"] = asyncio.run(states())
    finally:
        a.stop()
        b.stop()
    return record


def _outcomes(failed: list) -> str:
    """The failed requests by outcome, and when they were sent: a short message where a list diff would be long."""
    counts = Counter(str(outcome)[:120] for _, _, outcome, _ in failed)
    return f"{len(failed)} failed, sent from {failed[0][0]:.2f} to {failed[-1][0]:.2f} (monotonic s): {dict(counts)}"


def test_an_expert_added_through_one_replica_answers_on_the_other_within_the_sync_interval(fleet):
    status, added = fleet["add"]
    assert status == 200, added
    print(f"\nadd: {fleet['add_s']:.1f} s on A, on B {fleet['add_converge_s']:.1f} s later")
    # B notices within one interval, then loads, warms up and probes it as A did.
    assert fleet["add_converge_s"] <= SYNC_S + 2 * fleet["add_s"] + 5
    assert fleet["chandra_on_b"] == 200


def test_the_other_replica_shadows_the_candidate_and_routes_with_it_once_promoted(fleet, fleet_adapters):
    status, candidate = fleet["candidate"]
    assert status == 200, candidate
    assert candidate["candidate"]["version"] == adapter_fingerprint(fleet_adapters / "router4")
    shadow = fleet["shadow_b"]
    assert shadow["candidate"] == candidate["candidate"]["served_as"] and shadow["compared"] > 0
    assert shadow["replica"] != fleet["start_state"]["a"]["replica"]  # B's own statistics, named for B
    assert fleet["promote"][0] == 200, fleet["promote"]
    print(f"\npromote: {fleet['promote_s']:.1f} s on A, B routes with it {fleet['promote_converge_s']:.1f} s later")
    assert fleet["promote_converge_s"] <= SYNC_S + 2 * fleet["promote_s"] + 5


def test_two_conflicting_admin_calls_leave_one_state_on_both_replicas(fleet):
    statuses = sorted(status for status, _ in fleet["conflict"])
    assert statuses == [200, 409], fleet["conflict"]
    refused = next(body for status, body in fleet["conflict"] if status == 409)
    assert refused["error"]["code"] in ("state_conflict", "name_taken"), refused
    a, b = fleet["after_admin"]["a"], fleet["after_admin"]["b"]
    assert _served(a) == _served(b)
    assert [e["name"] for e in a["experts"]] == [*EXPERTS, "chandra-ocr", "tables"]


def test_the_steady_load_lost_nothing_and_failed_nothing_during_the_admin_changes(fleet):
    load = fleet["load"]
    print(f"\nload: {load['sent']} auto requests through the balancer, at least {load['fewest_in_flight']} in flight")
    assert load["answered"] == load["sent"], "requests lost"
    assert not fleet["admin_failed"], _outcomes(fleet["admin_failed"])
    assert load["fewest_in_flight"] >= 4


def test_a_replica_whose_vllm_dies_is_ejected_in_seconds_and_rejoins_after_its_restart(fleet):
    failover = fleet["failover"]
    print(f"\nfailover: failed {len(failover['failed'])}, slowest request {failover['slowest_s']:.2f} s, ejected "
          f"after {failover['eject_s']:.2f} s, vLLM restarted after {failover['restart_s']:.0f} s, rejoined "
          f"{failover['rejoin_s']:.2f} s after that")
    # Nothing B held or was sent before the ejection is lost: the balancer retries B's 502/503 on A.
    assert not failover["failed"], _outcomes(failover["failed"])
    assert failover["eject_s"] <= 3.0  # the balancer's own health check marked B down
    assert failover["rejoin_s"] <= 3.0  # ... and up again once its restarted vLLM was warm


def test_stopping_and_starting_both_replicas_comes_back_in_the_same_state(fleet):
    before = _served(fleet["end_state"])
    assert _served(fleet["restarted"]["a"]) == before
    assert _served(fleet["restarted"]["b"]) == before
