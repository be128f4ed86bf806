"""`python -m serving` as a user runs it, with real vLLM: either of vLLM's processes killed alone under load, restarts
that keep failing, and a SIGTERM that drains.

One service serves the kill tests and then the failing restarts, which end it (gateway.max_restarts=3: two kills,
then at least one failed restart); the drain test starts its own, since SIGTERM ends it too. Every process the
service starts carries a mark in its environment, and every process of a vLLM instance is in the process group of
its API server, so that orphans, whose parent is gone, are found as well.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import psutil
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import deployment_data
from tests.test_gateway_integration import GOOD, _messages

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
MARK = "LORA_ROUTER_TEST_SERVICE"
READY_TIMEOUT_S = 900
BODY = {"model": "auto", "messages": _messages(GOOD), "max_tokens": 400, "temperature": 0, "ignore_eos": True}


class Service:
    """`python -m serving` in a child process, its stderr in a file, ready when constructed."""

    def __init__(self, folder: Path, data: dict) -> None:
        config = folder / "deployment.yaml"
        config.write_text(yaml.safe_dump(data))
        self.mark = secrets.token_hex(8)
        self.groups: set[int] = set()  # the process groups of the vLLM API servers seen
        self.stderr_path = folder / "serving.err"
        with self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "serving", "--config", str(config), "--log", str(folder / "vllm.log")],
                stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT, env={**os.environ, MARK: self.mark})
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            line = pool.submit(self.process.stdout.readline)
            try:
                ready = line.result(timeout=READY_TIMEOUT_S)
            except concurrent.futures.TimeoutError:
                self.stop()  # ends the readline too
                raise
        assert ready.startswith("READY "), f"no READY line; stderr:\n{self.stderr()[-3000:]}"
        self.base_url = ready.split()[1]
        self.root_url = self.base_url.removesuffix("/v1")
        self.api_servers()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def vllm_processes(self) -> list[psutil.Process]:
        """Every live process the service started, orphans included: those with its mark, and those in the group of
        an API server seen (vLLM renames its engine core and worker, which wipes their environment)."""
        self.api_servers()
        found = []
        for p in psutil.process_iter():
            try:
                if p.pid == self.process.pid or p.status() == psutil.STATUS_ZOMBIE:
                    continue
                if os.getpgid(p.pid) in self.groups or p.environ().get(MARK) == self.mark:
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
                continue
        return found

    def api_servers(self) -> list[psutil.Process]:
        """vLLM's API servers the service runs now: its children running vLLM's entry point."""
        found = []
        try:
            children = psutil.Process(self.process.pid).children()
        except psutil.NoSuchProcess:
            return []
        for p in children:
            try:
                if "vllm.entrypoints.openai.api_server" in p.cmdline() and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except psutil.NoSuchProcess:
                continue
        self.groups.update(p.pid for p in found)
        return found

    def engine_core(self) -> psutil.Process:
        (core,) = [p for p in self.vllm_processes() if p.cmdline()[:1] == ["VLLM::EngineCore"]]
        return core

    def stop(self) -> None:
        """SIGTERM the service and wait; whatever it left is killed (after the tests looked for it)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=180)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for p in self.vllm_processes():
            p.kill()


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def _metric(session: aiohttp.ClientSession, service: Service, name: str) -> float:
    """The sum of a metric's samples on the gateway's /metrics (vLLM's own included while it is up)."""
    async with session.get(service.root_url + "/metrics") as r:
        text = await r.text()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == name)


async def _until(check, timeout_s: float, what: str, every_s: float = 0.1):
    """Poll the coroutine function `check` until it returns something true, and return that; fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not (result := await check()):
        assert time.monotonic() < deadline, f"{what} within {timeout_s:.0f} s"
        await asyncio.sleep(every_s)
    return result


async def _health(session: aiohttp.ClientSession, service: Service) -> tuple[int, dict]:
    async with session.get(service.root_url + "/health") as r:
        return r.status, await r.json()


def _first_new_api_server(service: Service, old_pid: int, old: list[psutil.Process],
                          timeout_s: float) -> list[psutil.Process]:
    """Wait for the next vLLM API server to start; return the processes of the old instance alive at that moment."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.pid != old_pid for p in service.api_servers()):
            return [p for p in old if _alive(p)]
        time.sleep(0.05)
    raise AssertionError(f"no new vLLM API server within {timeout_s:.0f} s")


@pytest.fixture(scope="module")
def service(tmp_path_factory, adapters_dir):
    folder = tmp_path_factory.mktemp("supervised")
    service = Service(folder, deployment_data(
        adapters_dir, gateway={"upstream_timeout_s": 60, "max_restarts": 3, "restart_backoff_s": 0.5},
        client={"router_mode": "choice"}))
    yield service
    service.stop()


@pytest.mark.parametrize("victim", ["api-server", "engine-core"])
def test_vllm_killed_under_load_gives_502_or_503_then_serves_again(service, victim):
    """SIGKILL of vLLM's API server alone, or of its engine core alone, while it runs requests: they fail fast,
    /health answers 503, no process of the old instance is left when the new one starts, and the service answers
    again once it is warm."""
    old = service.vllm_processes()
    (old_api,) = service.api_servers()
    target = old_api if victim == "api-server" else service.engine_core()
    restarter = concurrent.futures.ThreadPoolExecutor(1)

    async def under_load():
        async with aiohttp.ClientSession() as session:
            before = await _metric(session, service, "lora_router_gateway_upstream_restarts_total")

            async def one():
                start = time.monotonic()
                async with session.post(service.base_url + "/chat/completions", json=BODY) as r:
                    await r.read()
                    return r.status, time.monotonic() - start

            flying = [asyncio.create_task(one()) for _ in range(6)]
            await _until(lambda: _metric(session, service, "vllm:num_requests_running"), 120,
                         "vLLM did not start running the requests")
            target.kill()
            left = restarter.submit(_first_new_api_server, service, old_api.pid, old, 300)
            done = await asyncio.gather(*flying)
            health = await _health(session, service)
            # Once the supervisor took vLLM out, a new request is refused at once, with when to retry.
            await _until(lambda: _health_is(session, service, 503, "starting"), 60,
                         "the supervisor did not take vLLM out")
            async with session.post(service.base_url + "/chat/completions", json=BODY) as r:
                fresh = r.status, r.headers.get("Retry-After")
            return before, done, health, fresh, left

    before, done, health, fresh, left = asyncio.run(under_load())
    # A dead API server breaks off the answers (502) or refuses (503); a dead engine core makes vLLM's API server
    # answer 500 ("EngineCore encountered an issue"), which the gateway relays.
    failed = (502, 503) if victim == "api-server" else (500, 502, 503)
    assert all(status in (200, *failed) and seconds < 60 for status, seconds in done), done
    assert any(status in failed for status, _ in done), done
    assert health[0] == 503, health
    assert fresh[0] == 503 and fresh[1], fresh
    assert left.result() == [], f"processes of the killed vLLM still alive when the new one started: {left.result()}"
    restarter.shutdown()

    async def back():
        async with aiohttp.ClientSession() as session:
            await _until(lambda: _health_is(session, service, 200, "ok"), 400, "the service did not come back",
                         every_s=1)
            async with session.post(service.base_url + "/chat/completions", json={**BODY, "max_tokens": 2}) as r:
                answered = r.status
            return answered, await _metric(session, service, "lora_router_gateway_upstream_restarts_total")

    answered, after = asyncio.run(back())
    assert answered == 200
    assert after == before + 1
    assert not any(_alive(p) for p in old)


def test_restarts_that_keep_failing_end_the_service_with_the_reason(service):
    """vLLM's port taken while it is down: every restart fails, each counts, and once gateway.max_restarts are spent
    the service exits 1 naming why, with vLLM's own error, and leaves no process behind."""
    (api,) = service.api_servers()
    argv = api.cmdline()
    port = int(argv[argv.index("--port") + 1])
    with socket.socket() as squatter:
        # As vLLM does: the killed server's connections linger in TIME_WAIT, which only a plain bind minds.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        api.kill()
        deadline = time.monotonic() + 30
        while True:  # the port is free once no process of the dead server holds its socket
            try:
                squatter.bind(("127.0.0.1", port))
                break
            except OSError:
                assert time.monotonic() < deadline, f"port {port} stayed taken after vLLM's API server was killed"
                time.sleep(0.01)
        squatter.listen()
        code = service.process.wait(timeout=600)
    err = service.stderr()
    assert code == 1, err[-3000:]
    error = [line for line in err.splitlines() if line.startswith("error: ")][-1]  # the one line a user reads first
    assert "failed to restart" in error and "Address already in use" in error, error
    assert "its restarts are spent (3 of gateway.max_restarts=3)" in error, error
    assert service.vllm_processes() == []


def test_sigterm_drains_a_request_in_flight_then_exits_0(tmp_path, adapters_dir):
    """SIGTERM while a request streams: /health turns 503 and new requests are refused at once, the request in
    flight still finishes with 200, then the service exits 0 and leaves no process behind."""
    service = Service(tmp_path, deployment_data(adapters_dir, gateway={"drain_grace_s": 120},
                                                client={"router_mode": "choice"}))
    body = {**BODY, "max_tokens": 2000, "stream": True}
    try:
        async def run():
            async with aiohttp.ClientSession() as session:
                async with session.post(service.base_url + "/chat/completions", json=body) as r:
                    first = await r.content.readany()  # the first event: the expert is generating
                    rest = asyncio.create_task(r.content.read())
                    service.process.send_signal(signal.SIGTERM)
                    await _until(lambda: _health_is(session, service, 503, "draining"), 10,
                                 "/health did not turn 503 on SIGTERM")
                    in_flight = not rest.done()
                    async with session.post(service.base_url + "/chat/completions", json=BODY) as fresh:
                        refused = fresh.status, (await fresh.json())["error"]["code"]
                    return r.status, in_flight, refused, (first + await rest).decode()

        status, in_flight, refused, text = asyncio.run(run())
        assert in_flight, "the request finished before /health turned 503: nothing was drained"
        assert refused == (503, "shutting_down"), refused
        assert status == 200 and '"finish_reason":"length"' in text.replace(" ", "")
        assert text.rstrip().endswith("data: [DONE]"), text[-300:]
        assert service.process.wait(timeout=120) == 0, service.stderr()[-3000:]
        assert service.vllm_processes() == []
    finally:
        service.stop()


async def _health_is(session: aiohttp.ClientSession, service: Service, status: int, says: str) -> bool:
    got, body = await _health(session, service)
    return got == status and body.get("status") == says
