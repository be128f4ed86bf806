"""A worker node of a replica that spans nodes: `python -m serving --config FILE --headless --start-rank R` runs
engine.data_parallel_size_local of vLLM's engines, global ranks R onward, with no API server and no gateway; they
join the head (engine.data_parallel_address:data_parallel_rpc_port), whose gateway sends them requests pinned to
their ranks and whose API server loads every adapter into them.

It is not restarted alone: a head restarted without its workers, or a worker without its head, waits for a
handshake that never comes. When vLLM exits, the worker exits 1 with vLLM's last error, and the head gives up as
well; the group restarts whole (a LeaderWorkerSet's RecreateGroupOnPodRestart). SIGTERM ends vLLM and exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

from lora_router.deployment import DeploymentConfig
from serving.check import resolve_model
from serving.command import build_worker_command
from serving.launcher import ServerError
from serving.supervisor import ProcessGroup, describe_exit, last_error

log = logging.getLogger(__name__)

# Seconds a SIGTERMed vLLM gets to end its engines before SIGKILL.
_STOP_GRACE_S = 30.0


def run_worker(config: DeploymentConfig, start_rank: int, log_path: Path | None) -> int:
    """Run this node's engines until SIGTERM (exit 0) or until vLLM exits (ServerError naming why)."""
    command = build_worker_command(config, resolve_model(config.model.path), start_rank)
    log_path = log_path or Path("runs") / f"vllm-worker-rank{start_rank}.log"
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    group = ProcessGroup(command.argv, {**os.environ, **command.env}, log_path)
    engines = config.engine.data_parallel_size_local
    log.info("worker: engines of global ranks %d-%d joining the head at %s:%d; vLLM's log: %s", start_rank,
             start_rank + engines - 1, config.engine.data_parallel_address, config.engine.data_parallel_rpc_port,
             log_path)
    try:
        while not stop.wait(1.0):
            code = group.returncode()
            if code is not None:
                error = last_error(group.log())
                raise ServerError(f"the worker's vLLM exited ({describe_exit(code)})"
                                  f"{f'; its log ends with {error}' if error else ''}; the head's engines wait for "
                                  "these ranks: restart the whole replica")
        log.info("stopping the worker's engines")
        return 0
    finally:
        group.end(_STOP_GRACE_S)
