"""Starts one vLLM OpenAI server with the base model, the router and every expert, and makes it ready.

Ready means: every adapter passed its checks, vLLM answers /health, /v1/models lists the base model and
every adapter, each adapter has answered one image request (so no user pays the first-request cost), and
each adapter's answer to a fixed probe differs from the base model's (an adapter that silently does
nothing is a known vLLM failure).

Use as a library (tests, benchmarks):

    async with VLLMServer(load_config("configs/tiny-cpu.yaml")) as server:
        ... server.base_url ...
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from serving import openai_wire
from serving.adapters import AdapterInfo, check_adapters
from serving.command import ServerCommand, build_command
from serving.config import DeploymentConfig
from serving.images import prepare_image
from training.tiny_model import resolve_base_model

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
    """One vLLM server process for a deployment; an async context manager that starts and stops it."""

    def __init__(self, config: DeploymentConfig, log_path: str | Path | None = None, warm_up: bool = True,
                 probe: bool = True) -> None:
        self.config = config
        self.port = config.engine.port or free_port(config.engine.host)
        self.log_path = Path(log_path) if log_path else Path("runs") / f"vllm-{self.port}.log"
        self.warm_up = warm_up
        self.probe = probe
        self.process: subprocess.Popen | None = None
        self.adapters: list[AdapterInfo] = []
        self.command: ServerCommand | None = None

    @property
    def root_url(self) -> str:
        """Server root (health, tokenize, metrics)."""
        return openai_wire.root_url(self.config.engine.host, self.port)

    @property
    def base_url(self) -> str:
        """OpenAI-compatible API root."""
        return self.root_url + "/v1"

    @property
    def headers(self) -> dict[str, str]:
        return openai_wire.bearer_headers(self.config.engine.api_key)

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
        """Check adapters, start vLLM, and return once it is ready (or raise ServerError / AdapterError)."""
        model_path = resolve_base_model(self.config.model.path)
        self.adapters = check_adapters(self.config, model_path)  # before anything starts
        self.command = build_command(self.config, model_path, self.adapters, self.port)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            # Own process group, so stop() also ends vLLM's engine-core children.
            self.process = subprocess.Popen(self.command.argv, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, **self.command.env}, start_new_session=True)
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout, headers=self.headers) as session:
            await self._wait_healthy(session)
            await self._check_models(session)
            if self.warm_up or self.probe:
                await self._warm_up_and_probe(session)

    def stop(self) -> None:
        """Stop vLLM: SIGTERM to its process group, SIGKILL after a grace period. Safe to call twice."""
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

    def check_alive(self) -> None:
        """Raise ServerError with vLLM's own last words if the process has exited."""
        if self.process is not None and self.process.poll() is not None:
            code = self.process.returncode
            raise ServerError(f"vLLM exited with code {code}; last lines of {self.log_path}:\n{self.log_tail()}")

    async def _wait_healthy(self, session: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + self.config.engine.startup_timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                async with session.get(self.root_url + "/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(_POLL_S)
        raise ServerError(f"vLLM not healthy after {self.config.engine.startup_timeout_s:.0f} s; "
                          f"last lines of {self.log_path}:\n{self.log_tail()}")

    async def _check_models(self, session: aiohttp.ClientSession) -> None:
        async with session.get(self.base_url + "/models") as r:
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
        async with session.post(self.base_url + "/chat/completions", json=body) as r:
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

    async def _warm_up_and_probe(self, session: aiohttp.ClientSession) -> None:
        names = [self.config.model.served_name] + [a.name for a in self.config.adapters]
        probe_url = probe_image(seed=0)
        # One at a time first: the very first request pays vLLM's lazy initialisation (~20 s on CPU).
        answers = {name: await self.ask(session, name, probe_url, "Describe this screen.") for name in names}
        # Then all at once on a fresh image, so the batched multi-LoRA path is warm too.
        burst_url = probe_image(seed=1)
        await asyncio.gather(*(self.ask(session, n, burst_url, "Describe this screen.") for n in names))
        if not self.probe:
            return
        base = answers[self.config.model.served_name]
        noop = [a.name for a in self.config.adapters if answers[a.name].same_as(base)]
        if noop:
            raise ServerError(f"adapter(s) {noop} answer the probe exactly as the base model does: they change "
                              "nothing (all-zero LoRA B, or weights vLLM could not map onto the model)")


def ready_line(server: VLLMServer, adapters: Iterable[str]) -> str:
    """The one line printed when the server is ready."""
    return f"READY {server.base_url} base={server.config.model.served_name} adapters={','.join(adapters)}"
