"""What the two client command lines share: their flags, the client config they build, and how they say that
no server answers.

    python -m router_client IMAGE [flags]                          # one screenshot
    python -m router_client.batch --input DIR --output FILE [flags]  # many
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Literal

from lora_router.configuration import CommandError
from lora_router.deployment import DeploymentArguments, DeploymentConfig
from router_client.config import ClientConfig
from router_client.errors import APIConnectionError


@dataclass
class ClientArguments(DeploymentArguments):
    """Flags of both client commands; a flag left unset keeps the deployment's `client:` value (or default)."""

    base_url: str | None = field(default=None, metadata={
        "help": "API root of the server (default: the deployment's engine host and port, e.g. "
                "http://127.0.0.1:8000/v1)."})
    router_mode: Literal["auto", "choice", "one-token"] | None = field(default=None, metadata={
        "aliases": ["--mode"], "help": "Router mode (default: the deployment's client.router_mode)."})
    api_key: str | None = field(default=None, metadata={
        "help": "Bearer key of the server (default: engine.api_key, else $LORA_ROUTER_API_KEY)."})
    timeout_s: float | None = field(default=None, metadata={
        "help": "Seconds one HTTP attempt may take in all (default: client.timeout_s)."})
    connect_timeout_s: float | None = field(default=None, metadata={
        "help": "Seconds to get a connection (default: client.connect_timeout_s)."})
    read_timeout_s: float | None = field(default=None, metadata={
        "help": "Seconds without data from the server before an attempt fails (default: client.read_timeout_s)."})
    max_retries: int | None = field(default=None, metadata={
        "help": "Retries after connection errors, timeouts, 429 and 5xx (default: client.max_retries)."})

    def client_config(self, deployment: DeploymentConfig) -> ClientConfig:
        """The client config of `deployment` with the flags that were given."""
        given = {name: getattr(self, name) for name in ("base_url", "router_mode", "api_key", "timeout_s",
                                                        "connect_timeout_s", "read_timeout_s", "max_retries")}
        return ClientConfig.from_deployment(deployment, **{k: v for k, v in given.items() if v is not None})

    def start_server_hint(self) -> str:
        """How to start the server these flags talk to, or find another."""
        serve = " ".join(["python -m serving --config", str(self.config), *(f"--set {o}" for o in self.overrides)])
        return f"Start it with `{serve}`, or point --base-url at a running one."

    def unreachable(self, exc: APIConnectionError, base_url: str) -> CommandError:
        """The error to report when no server answered: the URL tried, why, and how to start one."""
        return CommandError(f"no answer from the server at {base_url} ({_reason(exc)}). {self.start_server_hint()}")


def _reason(exc: APIConnectionError) -> str:
    """Why a connection failed, in a few words (the URL is said elsewhere)."""
    cause = exc.__cause__
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__
    if isinstance(cause, OSError) and cause.errno == errno.ECONNREFUSED:
        return "connection refused"
    return getattr(cause, "strerror", None) or str(cause or exc)
