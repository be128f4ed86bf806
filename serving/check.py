"""`python -m serving --config FILE --check`: every start-up check that needs no vLLM, run without starting anything.

The launcher's checks before vLLM starts (serving.launcher.VLLMServer.start) and the routing settings the gateway
reads once vLLM is up: the settings themselves, the rule that a host other than loopback needs an API key, every
adapter (or the state file the admin API left, and its adapters), vLLM's LoRA limits, and the routing policy of the
`client:` section with the router's calibration. Exit status 0 when all pass; 2 with every problem listed.
"""

from __future__ import annotations

import logging
import subprocess
import sys

from lora_router.configuration import CommandError
from lora_router.deployment import (
    EMBEDDED_MODELS,
    LOOPBACK_HOSTS,
    ConfigError,
    DeploymentArguments,
    DeploymentConfig,
    EngineConfig,
)
from lora_router.routing import RoutingConfigError, RoutingPolicy
from serving.adapters import AdapterError
from serving.command import lora_limits, worker_problem
from serving.lifecycle import load_adapters

log = logging.getLogger(__name__)


class CheckFailed(ConfigError):
    """The deployment cannot start; `problems` lists each."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s), the deployment would not start:\n  - "
                         + "\n  - ".join(problems))


def resolve_model(path: str) -> str:
    """The base model folder model.path names. The embedded tiny model is the training package's to build (or copy
    from the shipped base), so serving runs its command instead of importing it."""
    if path not in EMBEDDED_MODELS:
        return path
    done = subprocess.run([sys.executable, "-m", "training.tiny_model", "--name", path], capture_output=True,
                          text=True)
    if done.returncode != 0:
        if "ModuleNotFoundError" in done.stderr:
            raise ConfigError(f"model.path {path!r} is the embedded tiny model, which the training extra builds: "
                              "install lora-router[train] (or serve a model folder)")
        raise CommandError(f"building the embedded model {path!r} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def open_host_problem(engine: EngineConfig) -> str | None:
    """Why the gateway may not bind engine.host (None if it may): an address others reach needs an API key."""
    if engine.api_key or engine.host in LOOPBACK_HOSTS:
        return None
    return (f"engine.host {engine.host!r} is reachable from other machines: set engine.api_key (or "
            "$LORA_ROUTER_API_KEY) so the gateway refuses requests without it")


def deployment_problems(config: DeploymentConfig) -> list[str]:
    """Every problem that would stop `config` from starting, found without vLLM; empty if none."""
    problems = [p for p in [open_host_problem(config.engine)] if p]
    # The same base model the launcher resolves: 'tiny' is the shipped base (copied into the cache), a hub id is
    # not downloaded (adapters' base fingerprints are then not compared, as at start).
    model_path = resolve_model(config.model.path)
    try:
        served, adapters = load_adapters(config, model_path)
    except AdapterError as exc:
        return problems + exc.problems
    except ConfigError as exc:  # a state file that does not fit the config
        return problems + [str(exc)]
    try:
        lora_limits(served, adapters.all())
    except ConfigError as exc:
        problems.append(str(exc))
    if adapters.router is not None:
        router = adapters.router
        try:
            RoutingPolicy.of(served, router_name=router.served_as, labels=router.labels,
                             calibration=router.calibration)
        except RoutingConfigError as exc:
            problems.append(str(exc))
    return problems


def check(args: DeploymentArguments, worker_rank: int | None = None) -> int:
    """Load and check the deployment `args` name (as a worker node from global rank `worker_rank`, if given); 0 when
    it would start, else CheckFailed (exit status 2)."""
    config = args.deployment()  # a bad setting: one ConfigError naming the file and every bad key
    problems = deployment_problems(config)
    if worker_rank is not None:
        problems += [p for p in [worker_problem(config.engine, worker_rank)] if p]
    if problems:
        raise CheckFailed(str(args.config), problems)
    log.info("%s: every start-up check that needs no vLLM passed (%d adapters, gateway on %s:%d)", args.config,
             len(config.adapters), config.engine.host, config.engine.port)
    return 0
