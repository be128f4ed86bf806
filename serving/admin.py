"""Change what a running deployment serves, through its gateway's admin API (serving.gateway.admin).

    python -m serving.admin state
    python -m serving.admin add-adapter --name chandra-ocr --path checkpoints/tiny/chandra-ocr \\
        --prompt "Transcribe this page to markdown."
    python -m serving.admin remove-adapter --name chandra-ocr
    python -m serving.admin candidate --path checkpoints/tiny/router4
    python -m serving.admin shadow
    python -m serving.admin promote
    python -m serving.admin rollback
    python -m serving.admin discard-candidate

The gateway's address and the admin key come from the deployment config (--config, --set; the key from
gateway.admin_api_key or $LORA_ROUTER_ADMIN_KEY). Paths are adapter folders inside gateway.adapter_dirs, relative
to the project root. The gateway's answer is printed as JSON; a refusal is one `error: ...` line (exit status 1).
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from lora_router.configuration import CommandError, ConfigError, check_types, parse_command, run_command
from lora_router.deployment import DeploymentArguments, DeploymentConfig
from lora_router.openai_wire import bearer_headers, error_message, root_url

log = logging.getLogger(__name__)

# action -> (method, path, the flags its body takes, the flags it requires)
ACTIONS: dict[str, tuple[str, str, tuple[str, ...], tuple[str, ...]]] = {
    "state": ("GET", "/admin/state", (), ()),
    "add-adapter": ("POST", "/admin/adapters", ("name", "path", "prompt"), ("name", "path")),
    "remove-adapter": ("DELETE", "/admin/adapters/{name}", (), ("name",)),
    "candidate": ("POST", "/admin/router/candidate", ("path",), ("path",)),
    "discard-candidate": ("DELETE", "/admin/router/candidate", (), ()),
    "shadow": ("GET", "/admin/router/shadow", (), ()),
    "promote": ("POST", "/admin/router/promote", (), ()),
    "rollback": ("POST", "/admin/router/rollback", (), ()),
}


@dataclass
class AdminArguments(DeploymentArguments):
    """The flags of `python -m serving.admin`."""

    action: str = field(default="state", metadata={"help": f"What to do: {', '.join(ACTIONS)}.",
                                                    "choices": list(ACTIONS)})
    name: str | None = field(default=None, metadata={"help": "add-adapter, remove-adapter: the expert's name."})
    path: str | None = field(default=None, metadata={
        "help": "add-adapter, candidate: the adapter folder (inside gateway.adapter_dirs; relative: to the project "
                "root)."})
    prompt: str | None = field(default=None, metadata={"help": "add-adapter: the expert's default prompt."})
    url: str | None = field(default=None, metadata={
        "help": "The gateway's root URL (default: engine.host and engine.port of the config)."})
    timeout_s: float = field(default=900.0, metadata={
        "help": "Seconds to wait for the answer (adding an adapter warms it up, removing one drains it)."})

    def __post_init__(self) -> None:
        check_types(self)
        if self.action not in ACTIONS:
            raise ConfigError(f"action must be one of {', '.join(ACTIONS)}, got {self.action!r}")
        missing = [f"--{flag}" for flag in ACTIONS[self.action][3] if not getattr(self, flag)]
        if missing:
            raise ConfigError(f"{self.action} needs {' and '.join(missing)}")
        if self.timeout_s <= 0:
            raise ConfigError(f"timeout_s must be > 0, got {self.timeout_s}")


def admin_request(args: AdminArguments, config: DeploymentConfig) -> urllib.request.Request:
    """The HTTP request an action makes (pure: no network)."""
    method, path, body_flags, _ = ACTIONS[args.action]
    if not config.gateway.admin_api_key:
        raise ConfigError("no admin key: set gateway.admin_api_key in the config (--set gateway.admin_api_key=...) "
                          "or $LORA_ROUTER_ADMIN_KEY, as the deployment was started with")
    base = args.url or root_url(config.engine.host, config.engine.port)
    body = {flag: getattr(args, flag) for flag in body_flags if getattr(args, flag) is not None}
    data = json.dumps(body).encode() if method == "POST" else None
    headers = {**bearer_headers(config.gateway.admin_api_key), "Content-Type": "application/json"}
    return urllib.request.Request(base.rstrip("/") + path.format(name=quote(args.name or "", safe="")), data=data,
                                  headers=headers, method=method)


def call(request: urllib.request.Request, timeout_s: float) -> dict[str, Any]:
    """Send it; the gateway's JSON answer, or CommandError with its message."""
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise CommandError(f"{request.get_method()} {request.full_url} answered {exc.code}: "
                           f"{error_message(exc.read().decode('utf-8', 'replace'))}") from None
    except (urllib.error.URLError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CommandError(f"no answer from the gateway at {request.full_url} ({reason}); is the deployment running "
                           "(python -m serving --config ...)?") from None


def run(args: AdminArguments) -> int:
    config = args.deployment()
    request = admin_request(args, config)
    log.info("%s %s", request.get_method(), request.full_url)
    print(json.dumps(call(request, args.timeout_s), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    (args,) = parse_command(AdminArguments, argv, prog="python -m serving.admin", description=__doc__,
                            yaml_option=False, positional=["action"])
    return run_command(lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
