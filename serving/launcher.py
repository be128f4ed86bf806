"""Starts one vLLM OpenAI server with the base model, the router and every expert, and the routing gateway
in front of it, and makes both ready.

Ready means: every adapter passed its checks, vLLM answers /health, /v1/models lists the base model and
every adapter, each adapter has answered one image request (so no user pays the first-request cost), each
adapter's answer to a fixed probe differs from the base model's (an adapter that silently does nothing is a
known vLLM failure), and the gateway listens on the configured host and port.

vLLM itself listens on loopback, on an internal port, with an internally generated key: only the gateway
reaches it. If vLLM dies, the gateway answers 503 at once and the launcher restarts vLLM (at most
gateway.max_restarts times), warms it up and serves again.

Use as a library (tests, benchmarks):

    async with VLLMServer(load_config("configs/tiny-cpu.yaml")) as server:
        ... server.base_url ...        # the gateway's OpenAI API root
        ... server.upstream_url ...    # vLLM's own, for side-by-side measurements
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from serving import openai_wire
from serving.adapters import AdapterInfo, check_adapters
from serving.command import ServerCommand, build_command
from serving.config import LOOPBACK_HOSTS, ConfigError, DeploymentConfig
from serving.gateway.app import Gateway
from serving.images import prepare_image
from serving.routing import RoutingPolicy
from training.tiny_model import resolve_base_model

log = logging.getLogger(__name__)

# Seconds between readiness polls, and the grace period between SIGTERM and SIGKILL on stop.
_POLL_S = 1.0
_STOP_GRACE_S = 30.0
# Largest top-logprob difference still taken as "the same answer" (bf16 noise is well below this).
_PROBE_TOLERANCE = 1e-3


class ServerError(RuntimeError):
    """vLLM did not become ready, or died; the message carries the end of its log."""


@dataclass(frozen=True)
class ProbeAnswer:
    """A greedy answer to the probe: its text and the first token's top log-probabilities."""

    text: str
    top_logprobs: dict[str, float]

    def same_as(self, other: "ProbeAnswer") -> bool:
        if self.text != other.text or self.top_logprobs.keys() != other.top_logprobs.keys():
            return False
        return all(abs(self.top_logprobs[t] - other.top_logprobs[t]) <= _PROBE_TOLERANCE for t in self.top_logprobs)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def probe_image(seed: int, size: tuple[int, int] = (640, 480)) -> str:
    """A deterministic screenshot-like PNG as a data URL (stripes and blocks, no text needed)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, (245, 245, 245))
    draw = ImageDraw.Draw(img)
    for i in range(12):
        y = 20 + i * 36
        shade = (37 * (i + seed)) % 200
        draw.rectangle([20 + 9 * ((i * 7 + seed) % 11), y, size[0] - 20, y + 24], fill=(shade, 90, 255 - shade))
    return prepare_image(img).data_url


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
        self.process: subprocess.Popen | None = None
        self.adapters: list[AdapterInfo] = []
        self.command: ServerCommand | None = None
        self.gateway: Gateway | None = None
        self.restarts = 0
        self.failure: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._supervisor: asyncio.Task | None = None

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
        AdapterError / ConfigError)."""
        engine = self.config.engine
        if not engine.api_key and engine.host not in LOOPBACK_HOSTS:
            raise ConfigError(f"engine.host {engine.host!r} is reachable from other machines: set engine.api_key "
                              "(or $LORA_ROUTER_API_KEY) so the gateway refuses requests without it")
        model_path = resolve_base_model(self.config.model.path)
        self.adapters = check_adapters(self.config, model_path)  # before anything starts
        self.command = build_command(self.config, model_path, self.adapters, self.upstream_port,
                                     host="127.0.0.1", api_key=self.upstream_key)
        await self._launch_vllm(warm_up=self.warm_up, probe=self.probe)
        self.gateway = Gateway(self.config, self.upstream_root, self.upstream_key, RoutingPolicy.of(self.config))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="gateway", daemon=True)
        self._thread.start()
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._start_gateway(), self._loop))

    async def _launch_vllm(self, warm_up: bool, probe: bool) -> None:
        assert self.command is not None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            # Own process group, so stop() also ends vLLM's engine-core children.
            self.process = subprocess.Popen(self.command.argv, stdout=log_file, stderr=subprocess.STDOUT,
                                            env={**os.environ, **self.command.env}, start_new_session=True)
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout, headers=self.upstream_headers) as session:
            await self._wait_healthy(session)
            await self._check_models(session)
            if warm_up or probe:
                await self._warm_up_and_probe(session, probe)

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

    async def _supervise(self) -> None:
        """Restart vLLM when it dies (at most gateway.max_restarts times); 503 meanwhile."""
        assert self.gateway is not None
        while True:
            await asyncio.sleep(_POLL_S)
            if self.process is None or self.process.poll() is None:
                continue
            self.gateway.ready = False
            code = self.process.returncode
            if self.restarts >= self.config.gateway.max_restarts:
                self.failure = (f"vLLM exited with code {code} and was restarted {self.restarts} times already; "
                                f"giving up. Last lines of {self.log_path}:\n{self.log_tail()}")
                log.error("%s", self.failure)
                return
            self.restarts += 1
            self.gateway.metrics.upstream_restarts.inc()
            log.warning("vLLM exited with code %s; restarting it (%d of %d). Last lines of %s:\n%s", code,
                        self.restarts, self.config.gateway.max_restarts, self.log_path, self.log_tail(10))
            try:
                self._stop_vllm()
                await self._launch_vllm(warm_up=True, probe=False)
                await self.gateway.resolve_policy()
            except (ServerError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
                log.error("restarting vLLM failed: %s", exc)
                continue
            self.gateway.ready = True
            log.info("vLLM is back after restart %d", self.restarts)

    def stop(self) -> None:
        """Stop the gateway and vLLM. Safe to call twice, and from any thread or loop."""
        loop, self._loop = self._loop, None
        if loop is not None and loop.is_running():
            asyncio.run_coroutine_threadsafe(self._stop_gateway(), loop).result(timeout=_STOP_GRACE_S)
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=_STOP_GRACE_S)
        self._stop_vllm()

    async def _stop_gateway(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.gateway is not None:
            self.gateway.ready = False
            await self.gateway.close()

    def _stop_vllm(self) -> None:
        """SIGTERM to vLLM's process group, SIGKILL after a grace period."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass

    def kill_vllm(self) -> None:
        """SIGKILL vLLM's process group, as a crash would (fault tests); the supervisor then restarts it."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)

    def check_alive(self) -> None:
        """Raise ServerError once vLLM died and could not be restarted, with its own last words."""
        if self.failure:
            raise ServerError(self.failure)
        if self.gateway is None and self.process is not None and self.process.poll() is not None:
            code = self.process.returncode
            raise ServerError(f"vLLM exited with code {code}; last lines of {self.log_path}:\n{self.log_tail()}")

    async def _wait_healthy(self, session: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + self.config.engine.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(f"vLLM exited with code {self.process.returncode}; last lines of "
                                  f"{self.log_path}:\n{self.log_tail()}")
            try:
                async with session.get(self.upstream_root + "/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(_POLL_S)
        raise ServerError(f"vLLM not healthy after {self.config.engine.startup_timeout_s:.0f} s; "
                          f"last lines of {self.log_path}:\n{self.log_tail()}")

    async def _check_models(self, session: aiohttp.ClientSession) -> None:
        async with session.get(self.upstream_url + "/models") as r:
            if r.status != 200:
                raise ServerError(f"GET /v1/models answered {r.status}: {openai_wire.error_message(await r.text())}")
            served = {m["id"] for m in (await r.json())["data"]}
        wanted = [self.config.model.served_name] + [a.name for a in self.config.adapters]
        missing = [name for name in wanted if name not in served]
        if missing:
            raise ServerError(f"vLLM does not list {missing} in /v1/models (it lists {sorted(served)})")

    async def ask(self, session: aiohttp.ClientSession, model: str, image_url: str, text: str,
                  max_tokens: int = 4) -> ProbeAnswer:
        """One greedy image request; returns the answer and its first token's top log-probabilities."""
        body = openai_wire.chat_request(model, [openai_wire.user_turn(image_url, text)], max_tokens, logprobs=True,
                                        top_logprobs=5)
        # Straight to vLLM with the internal key, whatever the caller's session sends.
        async with session.post(self.upstream_url + "/chat/completions", json=body, headers=self.upstream_headers) as r:
            if r.status != 200:
                raise ServerError(f"{model}: probe request answered {r.status}: "
                                  f"{openai_wire.error_message(await r.text())}")
            answer = await r.json()
        try:
            completion = openai_wire.read_completion(answer)
        except openai_wire.ResponseFormatError as exc:
            raise ServerError(f"{model}: probe answer: {exc}") from None
        tops = completion.logprobs[0].top_logprobs if completion.logprobs else {}
        return ProbeAnswer(text=completion.text, top_logprobs=tops)

    async def _warm_up_and_probe(self, session: aiohttp.ClientSession, probe: bool) -> None:
        names = [self.config.model.served_name] + [a.name for a in self.config.adapters]
        probe_url = probe_image(seed=0)
        # One at a time first: the very first request pays vLLM's lazy initialisation (~20 s on CPU).
        answers = {name: await self.ask(session, name, probe_url, "Describe this screen.") for name in names}
        # Then all at once on a fresh image, so the batched multi-LoRA path is warm too.
        burst_url = probe_image(seed=1)
        await asyncio.gather(*(self.ask(session, n, burst_url, "Describe this screen.") for n in names))
        if not probe:
            return
        base = answers[self.config.model.served_name]
        noop = [a.name for a in self.config.adapters if answers[a.name].same_as(base)]
        if noop:
            raise ServerError(f"adapter(s) {noop} answer the probe exactly as the base model does: they change "
                              "nothing (all-zero LoRA B, or weights vLLM could not map onto the model)")


def ready_line(server: VLLMServer, adapters: Iterable[str]) -> str:
    """The one line printed when the server is ready."""
    return (f"READY {server.base_url} auto={server.config.gateway.auto_model} "
            f"base={server.config.model.served_name} adapters={','.join(adapters)}")
