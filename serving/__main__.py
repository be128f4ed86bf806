"""Serve a deployment: `python -m serving --config configs/tiny-cpu.yaml [--set engine.port=8001 ...]`.

Checks every adapter, starts vLLM on loopback, waits until it is healthy, lists every adapter, warmed up and
probed, starts the routing gateway on engine.host:engine.port (model "auto" routes a screenshot), then prints one
READY line naming the gateway's URL. `--check` runs every start-up check that needs no vLLM and exits (0, or 2
with every problem listed; serving.check). Ctrl-C / SIGTERM stop both cleanly. If vLLM dies, the gateway answers 503
and the launcher restarts vLLM (at most gateway.max_restarts times); past that it exits non-zero with vLLM's error.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

from lora_router.configuration import parse_command, run_command
from lora_router.deployment import DeploymentArguments, DeploymentConfig
from serving.check import check
from serving.launcher import ServerError, VLLMServer, ready_line

log = logging.getLogger(__name__)


@dataclass
class ServeArguments(DeploymentArguments):
    """The flags of `python -m serving`."""

    log: Path | None = field(default=None, metadata={"help": "vLLM log file (default: runs/vllm-<port>.log)."})
    check: bool = field(default=False, metadata={
        "help": "Run every start-up check that needs no vLLM (settings, host and key, adapters, LoRA limits, routing) "
                "and exit: 0, or 2 with every problem listed."})


async def serve(config: DeploymentConfig, log_path: Path | None) -> int:
    """Run the server until a signal arrives (exit 0) or vLLM dies (exit 1)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with VLLMServer(config, log_path=log_path) as server:
        print(ready_line(server, [a.name for a in server.config.adapters]), flush=True)
        while not stop.is_set():
            server.check_alive()
            try:
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass
        log.info("stopping the gateway and vLLM")
    return 0


def main(argv: list[str] | None = None) -> int:
    (args,) = parse_command(ServeArguments, argv, prog="python -m serving", description=__doc__, yaml_option=False)
    if args.check:
        return run_command(lambda: check(args))
    return run_command(lambda: asyncio.run(serve(args.deployment(), args.log)), runtime_errors=(ServerError,))


if __name__ == "__main__":
    raise SystemExit(main())
