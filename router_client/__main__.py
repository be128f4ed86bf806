"""One screenshot from the command line: its route, the route's confidence, and the expert's answer.

    python -m router_client --config configs/tiny-cpu.yaml screen.png [--prompt "Click on March 14, 2026."]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from router_client.client import RouterClient
from router_client.config import ClientConfig
from router_client.errors import ClientConfigError, RouterClientError
from router_client.types import ProcessResult
from serving.config import ConfigError, load_config


async def _process(cfg: ClientConfig, image: str, prompt: str | None) -> ProcessResult:
    async with RouterClient(cfg) as client:
        return await client.process(image, prompt)


def main(argv: Sequence[str] | None = None) -> int:
    """The one-shot command line; returns the exit status (1: the request failed, 2: bad arguments)."""
    parser = argparse.ArgumentParser(prog="python -m router_client", description=__doc__.split("\n\n")[0])
    parser.add_argument("image", help="Screenshot file (png, jpg, webp, ...).")
    parser.add_argument("--config", required=True, help="Deployment YAML (e.g. configs/tiny-cpu.yaml).")
    parser.add_argument("--prompt", help="Task prompt (default: the routed expert's prompt from the config).")
    parser.add_argument("--base-url", help="API root of the server (default: engine host and port of the config).")
    parser.add_argument("--mode", choices=("auto", "choice", "one-token"), help="Router mode (default: config).")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("base_url", args.base_url), ("router_mode", args.mode)) if v is not None}
    try:
        cfg = ClientConfig.from_deployment(load_config(args.config), **overrides)
        result = asyncio.run(_process(cfg, args.image, args.prompt))
    except (ConfigError, ClientConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RouterClientError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(result.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
