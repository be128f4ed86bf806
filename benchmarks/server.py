"""The server a benchmark measures, in a child process of its own (the shape `lora-router serve` has), and what the
benchmark needs to know of it."""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lora_router.configuration import CommandError, setup_logging
from lora_router.deployment import DeploymentConfig
from serving.command import ServerCommand
from serving.launcher import VLLMServer


@dataclass(frozen=True)
class Served:
    """What the benchmark needs of the server it started: the gateway's API root, vLLM's own and its key, and the
    command that started vLLM."""

    base_url: str
    upstream_url: str
    upstream_key: str
    command: ServerCommand
    served_names: dict[str, str]  # public adapter name -> the versioned name vLLM serves it under


class ServerProcess:
    """serving.launcher.VLLMServer (vLLM and the gateway) in a child process, the shape `python -m serving` has:
    run in this process, the gateway's event loop shared an interpreter, and so the GIL, with the load generator's,
    and its throughput at c=16 was 16% below the client-side path's on twins of the same screenshots."""

    def __init__(self, deployment: DeploymentConfig, log_path: Path) -> None:
        context = multiprocessing.get_context("spawn")  # a clean interpreter: no fork of this one's threads
        self._conn, self._child = context.Pipe()
        self._process = context.Process(target=_serve, args=(deployment, log_path, self._child), name="vllm-server",
                                        daemon=True)

    async def start(self) -> Served:
        """Start the child and wait until the server is ready; its start-up error is raised here."""
        self._process.start()
        self._child.close()  # the child's end lives in the child now: its exit reads as EOF here
        answer = await asyncio.to_thread(self._conn.recv)
        if isinstance(answer, BaseException):
            self._process.join()
            raise answer
        return answer

    @property
    def pid(self) -> int:
        """The child's process id: the gateway runs in it, and vLLM's processes descend from it."""
        return self._process.pid

    def cpu_s(self) -> float:
        """CPU seconds used so far by the server's processes: the gateway's (the child) and vLLM's (its descendants)."""
        return process_tree_cpu_s(self.pid)

    def kill_vllm(self) -> None:
        """SIGKILL the server's vLLM (its gateway stays, and its launcher restarts vLLM)."""
        self._conn.send("kill_vllm")

    def stop(self) -> None:
        """Ask the child to stop the server and wait for it."""
        if self._process.is_alive():
            self._conn.send("stop")
            self._process.join(timeout=120)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join()


def _serve(deployment: DeploymentConfig, log_path: Path, conn) -> None:
    """The child: start the server, send Served (or the start-up error), serve until told to stop."""
    # multiprocessing's terminate() sends SIGTERM: leave through `finally`, so vLLM is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    setup_logging()
    server = VLLMServer(deployment, log_path=log_path)
    try:
        try:
            asyncio.run(server.start())
        except Exception as exc:  # any start-up failure goes to the parent, which raises it
            conn.send(exc)
            return
        conn.send(Served(server.base_url, server.upstream_url, server.upstream_key, server.command,
                         server.adapters.public_names()))
        while True:
            try:
                message = conn.recv()
            except EOFError:  # the parent is gone
                return
            if message == "stop":
                return
            if message == "kill_vllm":  # the failover phase's fault, as a crash would cause it
                server.kill_vllm()
    finally:
        server.stop()


def process_tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` and its living descendants (one that exits mid-way drops out)."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return total
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


async def until(condition, what: str, deadline_s: float = 600.0) -> None:
    """Wait for the async `condition` (polled every 0.2 s) to be true; CommandError naming `what` past the deadline."""
    start = time.monotonic()
    while not await condition():
        if time.monotonic() - start > deadline_s:
            raise CommandError(f"waited {deadline_s:g} s for {what}")
        await asyncio.sleep(0.2)
