"""Serve a deployment: `python -m serving --config configs/tiny-cpu.yaml [--set engine.port=8001 ...]`.

Checks every adapter, starts vLLM on loopback, waits until it is healthy, lists every adapter, warmed up and
probed, starts the routing gateway on engine.host:engine.port (model "auto" routes a screenshot), then prints one
READY line naming the gateway's URL. `--check` runs every start-up check that needs no vLLM and exits (0, or 2
with every problem listed; serving.check). If vLLM dies, the gateway answers 503 and the launcher ends what is left
of it and restarts it (at most gateway.max_restarts times, backing off exponentially); past that, or when a restart
fails for a reason a retry cannot fix, it exits 1 with the reason and vLLM's error.

A replica over several nodes (engine.data_parallel_size_local < data_parallel_size): this command on the head node,
and `python -m serving --config ... --headless --start-rank R` on each worker node (serving.worker), which runs its
engines only; the head then exits 1 when vLLM dies or a worker's rank stops answering, instead of restarting.

SIGTERM or Ctrl-C drains: /health answers 503 at once and new requests are refused, the requests in flight finish
(at most gateway.drain_grace_s), then the gateway and vLLM stop and the exit status is 0. During start-up they stop
vLLM at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

from lora_router.configuration import parse_command, run_command
from lora_router.deployment import ConfigError, DeploymentArguments, DeploymentConfig
from serving.check import check
from serving.launcher import ServerError, VLLMServer, ready_line
from serving.worker import run_worker

log = logging.getLogger(__name__)


@dataclass
class ServeArguments(DeploymentArguments):
    """The flags of `python -m serving`."""

    log: Path | None = field(default=None, metadata={"help": "vLLM log file (default: runs/vllm-<port>.log)."})
    check: bool = field(default=False, metadata={
        "help": "Run every start-up check that needs no vLLM (settings, host and key, adapters, LoRA limits, routing) "
                "and exit: 0, or 2 with every problem listed."})
    headless: bool = field(default=False, metadata={
        "help": "Run this node's share of a replica that spans nodes: engine.data_parallel_size_local engines from "
                "global rank --start-rank, no API server and no gateway (serving.worker)."})
    start_rank: int | None = field(default=None, metadata={
        "help": "With --headless: the global rank of this node's first engine (the head runs ranks "
                "0..data_parallel_size_local-1)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.headless != (self.start_rank is not None):
            raise ConfigError("--headless and --start-rank go together: a worker node runs the engines from a rank")


async def serve(config: DeploymentConfig, log_path: Path | None) -> int:
    """Run the server until a signal arrives (drain, stop, exit 0) or vLLM dies past its restarts (exit 1)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = VLLMServer(config, log_path=log_path)
    starting = asyncio.ensure_future(server.start())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            log.info("stopped while starting; stopping vLLM")
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            return 0
        starting.result()  # a start-up failure ends here
        print(ready_line(server, [a.name for a in server.config.adapters]), flush=True)
        while not stop.is_set():
            server.check_alive()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
        log.info("draining: /health answers 503; the requests in flight have %g s to finish",
                 server.config.gateway.drain_grace_s)
        await server.drain()
        log.info("stopping the gateway and vLLM")
    finally:
        stopping.cancel()
        server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    (args,) = parse_command(ServeArguments, argv, prog="python -m serving", description=__doc__, yaml_option=False)
    if args.check:
        return run_command(lambda: check(args, worker_rank=args.start_rank))
    if args.headless:
        return run_command(lambda: run_worker(args.deployment(), args.start_rank, args.log),
                           runtime_errors=(ServerError,))
    return run_command(lambda: asyncio.run(serve(args.deployment(), args.log)), runtime_errors=(ServerError,))


if __name__ == "__main__":
    raise SystemExit(main())
