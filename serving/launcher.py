"""Starts one vLLM OpenAI server with the base model, the router and every expert, and the routing gateway
in front of it, and makes both ready.

Ready means: every adapter passed its checks, vLLM answers /health, /v1/models lists the base model and
every adapter, each adapter has answered one image request (so no user pays the first-request cost), each
adapter's answer to a fixed probe differs from the base model's (an adapter that silently does nothing is a
known vLLM failure), and the gateway listens on the configured host and port.

The adapters are the config's, or, when the admin API left a state file, the ones it left (serving.lifecycle).
vLLM serves each under a versioned name; its LoRA slots and rank limit are fixed at start (engine.max_loras,
engine.max_lora_rank, engine.lora_headroom) and kept through restarts.

vLLM itself listens on loopback, on an internal port, with an internally generated key: only the gateway
reaches it. It runs in its own process group, which every way out ends whole and waits for (serving.supervisor).
If vLLM dies (its API server exits, or its engine core dies and /health says so), the gateway answers 503 at once;
the launcher ends what is left of the old instance, restarts vLLM after an exponential back-off
(gateway.restart_backoff_s), warms it up and serves again. Past gateway.max_restarts restarts (failed ones count),
or on a restart that failed for a reason a retry cannot fix, `failure` says why and `python -m serving` exits 1.
drain() stops taking requests and waits for those in flight, as `python -m serving` does on SIGTERM.

Use as a library (tests, benchmarks):

    async with VLLMServer(load_config("configs/tiny-cpu.yaml")) as server:
        ... server.base_url ...        # the gateway's OpenAI API root
        ... server.upstream_url ...    # vLLM's own, for side-by-side measurements
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import aiohttp
from aiohttp import web

from lora_router import openai_wire
from lora_router.deployment import ConfigError, DeploymentConfig
from serving.adapters import AdapterError, AdapterInfo, base_fingerprint
from serving.check import open_host_problem, resolve_model
from serving.command import ServerCommand, build_command, lora_limits
from serving.gateway.app import Gateway
from serving.gateway.metrics import PREFIX
from serving.gateway.upstream import RANK_HEADER
from serving.lifecycle import AdapterSet, config_adapters, load_adapters
from serving.probe import PROBE_TEXT, ProbeAnswer, ProbeError, ask, warm_up_and_probe
from serving.supervisor import (
    GroupSurvived,
    ProcessGroup,
    check_unchanged,
    describe_exit,
    last_error,
    permanent_cause,
    restart_delay,
)

log = logging.getLogger(__name__)

# Seconds between readiness and liveness polls (short: /health turns 503 this soon after vLLM dies, and a balancer's
# ejection follows), between two looks at the requests in flight while draining, and the grace periods between
# SIGTERM and SIGKILL when vLLM is ended: with its API server alive, and without it (the orphans have nothing left
# to finish; an orphaned engine core was seen to take over 30 s to honour SIGTERM).
_POLL_S = 0.25
_DRAIN_POLL_S = 0.1
_STOP_GRACE_S = 30.0
_ORPHAN_GRACE_S = 5.0


class ServerError(RuntimeError):
    """vLLM did not become ready, or died; the message carries the end of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class VLLMServer:
    """vLLM and the routing gateway for one deployment; an async context manager that starts and stops both.

    The gateway runs in its own thread and event loop, so the server outlives the loop that started it
    (tests start it once and use it from many asyncio.run calls) and stop() works from anywhere.
    """

    def __init__(self, config: DeploymentConfig, log_path: str | Path | None = None, warm_up: bool = True,
                 probe: bool = True) -> None:
        self.config = config
        self.port = config.engine.port or free_port(config.engine.host)
        self.upstream_port = free_port("127.0.0.1")
        self.upstream_key = secrets.token_urlsafe(24)
        self.log_path = Path(log_path) if log_path else Path("runs") / f"vllm-{self.port}.log"
        self.warm_up = warm_up
        self.probe = probe
        self.group: ProcessGroup | None = None
        self.model_path: str | None = None
        self.adapters: AdapterSet | None = None
        self.command: ServerCommand | None = None
        self.gateway: Gateway | None = None
        self.restarts = 0
        self.failure: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._supervisor: asyncio.Task | None = None

    @property
    def process(self) -> subprocess.Popen | None:
        """vLLM's API server, the leader of its process group."""
        return self.group.process if self.group else None

    @property
    def root_url(self) -> str:
        """The gateway's root (health, metrics, tokenize)."""
        return openai_wire.root_url(self.config.engine.host, self.port)

    @property
    def base_url(self) -> str:
        """The gateway's OpenAI-compatible API root."""
        return self.root_url + "/v1"

    @property
    def headers(self) -> dict[str, str]:
        """What a caller sends: the deployment's API key, if it has one."""
        return openai_wire.bearer_headers(self.config.engine.api_key)

    @property
    def upstream_root(self) -> str:
        """vLLM's own root, on loopback (benchmarks compare the gateway against it)."""
        return f"http://127.0.0.1:{self.upstream_port}"

    @property
    def upstream_url(self) -> str:
        return self.upstream_root + "/v1"

    @property
    def upstream_headers(self) -> dict[str, str]:
        return openai_wire.bearer_headers(self.upstream_key)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    async def __aenter__(self) -> "VLLMServer":
        try:
            await self.start()
        except BaseException:
            self.stop()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        self.stop()

    async def start(self) -> None:
        """Check adapters, start vLLM and the gateway; return once both are ready (or raise ServerError /
        AdapterError / ConfigError). `config` becomes the deployment as served: the state file's adapters, if
        any, and vLLM's LoRA limits."""
        refused = open_host_problem(self.config.engine)
        if refused:
            raise ConfigError(refused)
        self.model_path = resolve_model(self.config.model.path)
        own_adapters = config_adapters(self.config)
        served, self.adapters = load_adapters(self.config, self.model_path)  # before anything starts
        max_loras, max_rank = lora_limits(served, self.adapters.all())
        # Fixed here: a restart with adapters added at runtime must give vLLM the same slots and rank limit.
        self.config = dataclasses.replace(served, engine=dataclasses.replace(served.engine, max_loras=max_loras,
                                                                             max_lora_rank=max_rank))
        await self._launch_vllm(self.adapters.all(), warm_up=self.warm_up, probe=self.probe)
        self.gateway = Gateway(self.config, self.upstream_root, self.upstream_key, self.adapters,
                               base=base_fingerprint(self.model_path), config_adapters=own_adapters,
                               replica=f"{socket.gethostname()}:{self.port}")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="gateway", daemon=True)
        self._thread.start()
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._start_gateway(), self._loop))

    async def _launch_vllm(self, adapters: list[AdapterInfo], warm_up: bool, probe: bool) -> None:
        assert self.model_path is not None
        self.command = build_command(self.config, self.model_path, adapters, self.upstream_port, host="127.0.0.1",
                                     api_key=self.upstream_key)
        self.group = ProcessGroup(self.command.argv, {**os.environ, **self.command.env}, self.log_path)
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout, headers=self.upstream_headers) as session:
            await self._wait_healthy(session)
            await self._check_models(session, adapters)
            if warm_up or probe:
                await self._warm_up_and_probe(session, adapters, probe)

    async def _start_gateway(self) -> None:
        """In the gateway's loop: open its upstream session, listen, and watch vLLM."""
        assert self.gateway is not None
        await self.gateway.open()
        await self.gateway.resolve_policy()
        # A caller that disconnects cancels its handler, which closes the upstream request and so aborts it in vLLM.
        self._runner = web.AppRunner(self.gateway.app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.config.engine.host, self.port).start()
        self.gateway.ready = True
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())
        self._supervisor.add_done_callback(self._supervisor_ended)

    def _supervisor_ended(self, task: asyncio.Task) -> None:
        # A supervisor that broke down would leave the service answering 503 for ever: it ends the service instead.
        if not task.cancelled() and task.exception() is not None:
            self.failure = f"the supervisor of vLLM failed: {task.exception()}"
            log.error("%s", self.failure, exc_info=task.exception())

    async def _supervise(self) -> None:
        """Watch vLLM; when it dies, end what is left of it and restart it (the gateway answers 503 meanwhile), until
        the restarts are spent or one fails for a reason a retry cannot fix: then `failure` says why."""
        assert self.gateway is not None
        settings = self.config.gateway
        while True:
            reason = await self._wait_dead()
            self.gateway.ready = False
            log.warning("vLLM %s. Last lines of %s:\n%s", reason, self.log_path, self.log_tail(10))
            engine = self.config.engine
            if engine.multi_node:
                await self._give_up(f"vLLM {reason}; its engines span nodes (engine.data_parallel_size_local="
                                    f"{engine.data_parallel_size_local} of {engine.data_parallel_size}), and a head "
                                    "restarted alone waits for workers that are gone: restart the whole replica")
                return
            failed = 0
            while True:
                # Nothing of the old instance may be left when the new one starts: it holds memory (a GPU's too).
                await asyncio.to_thread(self._end_vllm)
                if self.restarts >= settings.max_restarts:
                    await self._give_up(f"vLLM {reason}, and its restarts are spent ({self.restarts} of "
                                        f"gateway.max_restarts={settings.max_restarts})")
                    return
                delay = restart_delay(failed, settings.restart_backoff_s, settings.restart_backoff_max_s)
                self.restarts += 1
                self.gateway.metrics.upstream_restarts.inc()
                log.warning("restarting vLLM in %.1f s (restart %d of %d)", delay, self.restarts,
                            settings.max_restarts)
                await asyncio.sleep(delay)
                try:
                    # What the gateway serves now: adapters added, promoted or removed at runtime included.
                    adapters = self.gateway.lifecycle.served()
                    check_unchanged(adapters)
                    await self._launch_vllm(adapters, warm_up=True, probe=False)
                    await self.gateway.resolve_policy()
                    break
                except AdapterError as exc:
                    await self._give_up(f"restart {self.restarts} of vLLM failed, and every retry would: {exc}")
                    return
                except Exception as exc:  # whatever failed, the restart failed: counted, and the supervisor goes on
                    failed += 1
                    vllm_log = self.group.log() if self.group else ""
                    # The exception's first line, without the log tail it may carry: the failure message ends with it.
                    summary = str(exc).splitlines()[0].partition("; last lines of")[0]
                    error = last_error(vllm_log)
                    reason = (f"failed to restart (restart {self.restarts}: {summary}"
                              f"{f'; its log ends with {error}' if error else ''})")
                    cause = permanent_cause(vllm_log)
                    if cause:
                        await self._give_up(f"vLLM {reason}; its log shows {cause}, which a retry will not change")
                        return
                    log.error("vLLM %s", reason)
            self.gateway.ready = True
            log.info("vLLM is back after restart %d", self.restarts)

    async def _wait_dead(self) -> str:
        """Return once vLLM counts as dead, saying why: its API server exited, it answered /health with an error,
        which is vLLM's own verdict once its engine core died (its API server exits only seconds later), or, across
        nodes, a worker node's rank stopped answering (vLLM itself never notices that)."""
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout, headers=self.upstream_headers) as session:
            remote = asyncio.ensure_future(self._wait_remote_rank_gone(session)) if self.config.engine.multi_node \
                else None
            try:
                while True:
                    await asyncio.sleep(_POLL_S)
                    if remote is not None and remote.done():
                        return remote.result()
                    assert self.group is not None
                    code = self.group.returncode()
                    if code is not None:
                        return f"died: its API server exited ({describe_exit(code)})"
                    try:
                        async with session.get(self.upstream_root + "/health") as r:
                            if r.status != 200:
                                return f"died: it answered /health with {r.status} (its engine core is gone)"
                    except (aiohttp.ClientError, asyncio.TimeoutError):
                        pass  # busy, or its API server is exiting: the next look tells
            finally:
                if remote is not None:
                    remote.cancel()

    async def _wait_remote_rank_gone(self, session: aiohttp.ClientSession) -> str:
        """Return once a worker node's rank fails a one-token request pinned to it, saying which."""
        settings, engine = self.config.gateway, self.config.engine
        body = {"model": self.config.model.served_name, "max_tokens": 1,
                "messages": [{"role": "user", "content": "ok"}]}
        timeout = aiohttp.ClientTimeout(total=settings.rank_check_timeout_s)
        while True:
            await asyncio.sleep(settings.rank_check_interval_s)
            for rank in range(engine.data_parallel_size_local, engine.data_parallel_size):
                try:
                    async with session.post(self.upstream_url + "/chat/completions", json=body, timeout=timeout,
                                            headers={RANK_HEADER: str(rank)}) as r:
                        await r.read()
                        failure = None if r.status == 200 else f"answered {r.status}"
                except asyncio.TimeoutError:
                    failure = f"did not answer within {settings.rank_check_timeout_s:g} s"
                except aiohttp.ClientError as exc:
                    failure = f"failed: {exc}"
                if failure:
                    return (f"lost global rank {rank} (a worker node's engine): a one-token request pinned to it "
                            f"{failure}")

    async def _give_up(self, reason: str) -> None:
        await asyncio.to_thread(self._end_vllm)
        self.failure = f"{reason}; giving up. Last lines of {self.log_path}:\n{self.log_tail()}"
        log.error("%s", self.failure)

    async def drain(self) -> None:
        """Stop taking requests (/health answers 503, new requests get 503, vLLM is no longer restarted) and return
        once the requests in flight are answered, or after gateway.drain_grace_s."""
        if self._loop is not None:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._drain(), self._loop))

    async def _drain(self) -> None:
        assert self.gateway is not None
        self.gateway.draining = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        grace = self.config.gateway.drain_grace_s
        deadline = time.monotonic() + grace
        while (busy := self._busy()) and time.monotonic() < deadline:
            await asyncio.sleep(_DRAIN_POLL_S)
        if busy:
            log.warning("%d request(s) still in flight after gateway.drain_grace_s=%g s; stopping anyway", busy, grace)

    def _busy(self) -> int:
        """Chat requests the gateway is answering or holding in its queue."""
        assert self.gateway is not None
        registry = self.gateway.metrics.registry
        return int(sum(registry.get_sample_value(name) or 0
                       for name in (f"{PREFIX}_requests_in_flight", f"{PREFIX}_requests_queued")))

    def kill_vllm(self) -> None:
        """SIGKILL vLLM's API server, as a crash would: the fault the fleet test and the failover benchmark inject;
        the supervisor ends the rest of its group and restarts it."""
        if self.process is not None:
            self.process.kill()

    def stop(self) -> None:
        """Stop the gateway and vLLM (its whole process group, waited for). Safe to call twice, and from any thread
        or loop."""
        loop, self._loop = self._loop, None
        if loop is not None and loop.is_running():
            asyncio.run_coroutine_threadsafe(self._stop_gateway(), loop).result(timeout=_STOP_GRACE_S)
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=_STOP_GRACE_S)
        self._end_vllm()

    async def _stop_gateway(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        if self.gateway is not None:
            self.gateway.ready = False
            await self.gateway.close()

    def _end_vllm(self) -> None:
        """End vLLM's whole process group: SIGTERM, SIGKILL after a grace period; return once none of it is left."""
        if self.group is None:
            return
        try:
            self.group.end(_STOP_GRACE_S if self.group.returncode() is None else _ORPHAN_GRACE_S)
        except GroupSurvived as exc:
            raise ServerError(str(exc)) from None

    def check_alive(self) -> None:
        """Raise ServerError once vLLM died and could not be restarted, with the reason and vLLM's own last words."""
        if self.failure:
            raise ServerError(self.failure)
        code = self.group.returncode() if self.group else None
        if self.gateway is None and code is not None:
            raise ServerError(f"vLLM exited with {describe_exit(code)}; last lines of {self.log_path}:\n"
                              f"{self.log_tail()}")

    async def _wait_healthy(self, session: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + self.config.engine.startup_timeout_s
        while time.monotonic() < deadline:
            code = self.group.returncode() if self.group else None
            if code is not None:
                raise ServerError(f"vLLM exited with {describe_exit(code)}; last lines of {self.log_path}:\n"
                                  f"{self.log_tail()}")
            try:
                async with session.get(self.upstream_root + "/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(_POLL_S)
        raise ServerError(f"vLLM not healthy after {self.config.engine.startup_timeout_s:.0f} s; "
                          f"last lines of {self.log_path}:\n{self.log_tail()}")

    async def _check_models(self, session: aiohttp.ClientSession, adapters: list[AdapterInfo]) -> None:
        async with session.get(self.upstream_url + "/models") as r:
            if r.status != 200:
                raise ServerError(f"GET /v1/models answered {r.status}: {openai_wire.error_message(await r.text())}")
            served = {m["id"] for m in (await r.json())["data"]}
        wanted = [self.config.model.served_name] + [a.served_as for a in adapters]
        missing = [name for name in wanted if name not in served]
        if missing:
            raise ServerError(f"vLLM does not list {missing} in /v1/models (it lists {sorted(served)})")

    async def ask(self, session: aiohttp.ClientSession, model: str, image_url: str, text: str = PROBE_TEXT,
                  max_tokens: int = 4) -> ProbeAnswer:
        """One greedy image request straight to vLLM with the internal key, whatever the caller's session sends;
        a public adapter name is sent as the version vLLM serves."""
        served = self.gateway.names.served(model) if self.gateway else model
        return await ask(session, self.upstream_url, served, image_url, text, max_tokens, headers=self.upstream_headers)

    async def _warm_up_and_probe(self, session: aiohttp.ClientSession, adapters: list[AdapterInfo],
                                 probe: bool) -> None:
        try:
            noop = await warm_up_and_probe(session, self.upstream_url, self.config.model.served_name,
                                           [a.served_as for a in adapters], probe)
        except ProbeError as exc:
            raise ServerError(str(exc)) from None
        if noop:
            names = [a.name for a in adapters if a.served_as in noop]
            raise ServerError(f"adapter(s) {names} answer the probe exactly as the base model does: they change "
                              "nothing (all-zero LoRA B, or weights vLLM could not map onto the model)")


def ready_line(server: VLLMServer, adapters: Iterable[str]) -> str:
    """The one line printed when the server is ready."""
    return (f"READY {server.base_url} auto={server.config.gateway.auto_model} "
            f"base={server.config.model.served_name} adapters={','.join(adapters)}")
