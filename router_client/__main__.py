"""One screenshot from the command line: its route, the route's confidence, and the expert's answer.

    python -m router_client --config configs/tiny-cpu.yaml screen.png [--prompt "Click on March 14, 2026."]

The screenshot is checked before any request; if no server answers, the error says which URL was tried and
how to start one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lora_router.configuration import ConfigError, parse_command, run_command
from router_client import PreparedImage, prepare_image
from router_client.cli import ClientArguments
from router_client.client import RouterClient
from router_client.config import ClientConfig
from router_client.errors import APIConnectionError, APITimeoutError, InvalidImageError, RouterClientError
from router_client.types import ProcessResult


@dataclass
class RouteArguments(ClientArguments):
    """The flags of `python -m router_client`."""

    image: Path = field(kw_only=True, metadata={"help": "Screenshot file (png, jpg, webp, ...)."})
    prompt: str | None = field(default=None, metadata={
        "help": "Task prompt (default: the routed expert's prompt from the config)."})


async def _process(cfg: ClientConfig, image: PreparedImage, prompt: str | None) -> ProcessResult:
    async with RouterClient(cfg) as client:
        return await client.process(image, prompt)


def route_one(args: RouteArguments) -> int:
    """Check the settings and the screenshot, then route it and print the result."""
    cfg = args.client_config(args.deployment())
    try:
        image = prepare_image(args.image, max_pixels=cfg.max_pixels, max_image_pixels=cfg.max_image_pixels)
    except InvalidImageError as exc:
        raise ConfigError(f"{exc}: give a screenshot file (png, jpg, webp, ...)") from None
    try:
        result = asyncio.run(_process(cfg, image, args.prompt))
    except APITimeoutError:
        raise  # a server that is there but slow: its own message says which timeout
    except APIConnectionError as exc:
        raise args.unreachable(exc, cfg.base_url) from None
    print(result.describe())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The one-shot command line; returns the exit status (1: the request failed, 2: bad arguments or image)."""
    (args,) = parse_command(RouteArguments, argv, prog="python -m router_client", description=__doc__,
                            yaml_option=False, positional=["image"])
    return run_command(lambda: route_one(args), runtime_errors=(RouterClientError,))


if __name__ == "__main__":
    raise SystemExit(main())
