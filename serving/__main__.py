"""Serve a deployment: `python -m serving --config configs/tiny-cpu.yaml [--set engine.port=8001 ...]`.

Checks every adapter, starts vLLM, waits until it is healthy, lists every adapter, warmed up and probed,
then prints one READY line. Ctrl-C / SIGTERM stop vLLM cleanly; if vLLM dies, exits non-zero with its error.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from serving.config import ConfigError, DeploymentConfig, load_config
from serving.launcher import ServerError, VLLMServer, ready_line

DEFAULT_CONFIG = Path("configs/tiny-cpu.yaml")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="deployment YAML (%(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. engine.port=8001 or experts=[] (repeatable)")
    parser.add_argument("--log", type=Path, default=None, help="vLLM log file (default runs/vllm-<port>.log)")
    return parser


async def serve(config: DeploymentConfig, log: Path | None) -> int:
    """Run the server until a signal arrives (exit 0) or vLLM dies (exit 1)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with VLLMServer(config, log_path=log) as server:
        print(ready_line(server, [a.name for a in config.adapters]), flush=True)
        while not stop.is_set():
            server.check_alive()
            try:
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass
        print("stopping vLLM", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        return asyncio.run(serve(config, args.log))
    except (ConfigError, ServerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
