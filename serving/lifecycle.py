"""The adapter lifecycle's plain parts: what vLLM serves (AdapterSet), which folders the admin API may load from,
the state file a restart comes back from, and the public-to-versioned name table that lets an adapter drain.

The state file is also the fleet's one desired state when every replica's gateway.state_file names the same file
on a shared folder: each change is written as the next version only if the file is still at the version the
writer started from (update_state), so of two conflicting changes made at once on two replicas one is applied and
the other refused; every replica converges to the file (serving.gateway.lifecycle).

No HTTP here; the gateway (serving.gateway.lifecycle) does the loading and swapping.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import secrets
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from lora_router.configuration import check_types, from_mapping
from lora_router.deployment import AdapterConfig, ConfigError, DeploymentConfig
from serving.adapters import (
    AdapterError,
    AdapterInfo,
    base_fingerprint,
    check_adapter,
    check_adapters,
    served_pixel_limits,
)

log = logging.getLogger(__name__)

STATE_FORMAT = 1


class PathRefused(ValueError):
    """An admin call named a path outside the adapter folders; the message says which and why."""


def resolve_adapter_path(path: str, adapter_dirs: Sequence[Path], root: Path) -> Path:
    """The real folder an admin call names (relative: against `root`), symlinks followed; PathRefused unless it lies
    inside one of `adapter_dirs` (themselves resolved), or when it has a '..' part."""
    if not path:
        raise PathRefused("path is empty: name the adapter folder")
    if ".." in PurePath(path).parts:
        raise PathRefused(f"path {path!r} has a '..' part: name the adapter folder itself")
    real = (root / path).resolve()
    allowed = [folder.resolve() for folder in adapter_dirs]
    if not any(real != folder and real.is_relative_to(folder) for folder in allowed):
        raise PathRefused(f"path {path!r} resolves to {real}, which is not inside an adapter folder "
                          f"({', '.join(map(str, allowed)) or 'none configured'}; gateway.adapter_dirs)")
    return real


@dataclass
class AdapterRecord:
    """One adapter version as the state file keeps it."""

    name: str = field(metadata={"help": "Public name."})
    path: str = field(metadata={"help": "Adapter folder, absolute."})
    fingerprint: str = field(metadata={"help": "Version (serving.adapters.adapter_fingerprint) when it was loaded."})
    prompt: str = field(default="", metadata={"help": "An expert's default prompt."})

    def __post_init__(self) -> None:
        check_types(self, "adapter")

    @classmethod
    def of(cls, info: AdapterInfo) -> AdapterRecord:
        return cls(name=info.name, path=str(info.path), fingerprint=info.fingerprint, prompt=info.prompt)

    def config(self) -> AdapterConfig:
        return AdapterConfig(name=self.name, path=self.path, prompt=self.prompt)


@dataclass
class DeploymentState:
    """What the admin API left a deployment serving, so that a restart comes back as it was left."""

    config_adapters: list[str] = field(metadata={
        "help": "The config's own router and experts as name=path, when the admin API first changed them."})
    router: AdapterRecord | None = field(metadata={"help": "The live router version."})
    previous_router: AdapterRecord | None = field(metadata={"help": "The router version rollback goes back to."})
    experts: list[AdapterRecord] = field(metadata={"help": "Every expert, in order."})
    format: int = field(default=STATE_FORMAT, metadata={"help": "State file format."})
    candidate: AdapterRecord | None = field(default=None, metadata={
        "help": "A router version loaded beside the live one and shadowed, if any."})
    shadow_fraction: float | None = field(default=None, metadata={
        "help": "The share of auto requests the candidate also routes (None: gateway.shadow_fraction)."})
    version: int = field(default=0, metadata={"help": "Raised by one with every change; 0 before the first."})

    def __post_init__(self) -> None:
        check_types(self, "state")
        if self.format != STATE_FORMAT:
            raise ConfigError(f"state format {self.format} is not {STATE_FORMAT}")

    def served_config(self, config: DeploymentConfig) -> DeploymentConfig:
        """`config` with this state's live router and experts in place of its own."""
        return dataclasses.replace(config, router=self.router.config() if self.router else None,
                                   experts=[e.config() for e in self.experts])


def config_adapters(config: DeploymentConfig) -> list[str]:
    """A config's router and experts as name=path: what a state file was left for."""
    return [f"{a.name}={config.adapter_path(a)}" for a in config.adapters]


class StateConflict(Exception):
    """The state file moved on since a change started from it: another replica changed the fleet first."""

    def __init__(self, expected: int, found: int) -> None:
        super().__init__(f"the fleet's state is at version {found}, not {expected} as when this change started")
        self.expected, self.found = expected, found


def update_state(path: Path, expected_version: int, state: DeploymentState) -> DeploymentState:
    """Write `state` as version `expected_version` + 1, if the file is still at `expected_version` (0: no file);
    StateConflict otherwise, and nothing is written. One writer at a time, across processes and machines sharing
    the folder: an exclusive lock on a lock file beside it, held only while comparing and writing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_name(f"{path.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            current = read_state(path)
            found = current.version if current else 0
            if found != expected_version:
                raise StateConflict(expected_version, found)
            written = dataclasses.replace(state, version=expected_version + 1)
            write_state(path, written)
            return written
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_state(path: Path, state: DeploymentState) -> None:
    """Write the state file atomically (a temporary file renamed over it): a crash leaves the old one or the new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # The process id is not unique on a folder that replicas on several machines share.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with temporary.open("w") as f:
            f.write(json.dumps(dataclasses.asdict(state), indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def read_state(path: Path) -> DeploymentState | None:
    """The state file, or None when there is none; ConfigError naming the file when it cannot be read."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"state file {path}: cannot be read ({exc}); delete it to serve the config's adapters")
    try:
        return from_mapping(DeploymentState, data, "state")
    except ConfigError as exc:
        raise ConfigError(f"state file {path}: {exc}; delete it to serve the config's adapters") from None


@dataclass(frozen=True)
class AdapterSet:
    """The adapters vLLM serves: the live router, the previous router version (kept loaded for rollback) and
    the experts."""

    router: AdapterInfo | None
    experts: tuple[AdapterInfo, ...]
    previous_router: AdapterInfo | None = None

    def all(self) -> list[AdapterInfo]:
        """Every adapter vLLM must load, router versions first."""
        return [a for a in (self.router, self.previous_router) if a is not None] + list(self.experts)

    def public_names(self) -> dict[str, str]:
        """Public name -> versioned name: the live router and every expert."""
        return {a.name: a.served_as for a in ([self.router] if self.router else []) + list(self.experts)}

    def expert(self, name: str) -> AdapterInfo | None:
        return next((e for e in self.experts if e.name == name), None)

    def state(self, config_adapters: list[str]) -> DeploymentState:
        record = AdapterRecord.of
        return DeploymentState(config_adapters=config_adapters, router=record(self.router) if self.router else None,
                               previous_router=record(self.previous_router) if self.previous_router else None,
                               experts=[record(e) for e in self.experts])


def load_adapters(config: DeploymentConfig, base_model_dir: str | None) -> tuple[DeploymentConfig, AdapterSet]:
    """What a deployment serves at start, checked: the state file's adapters when the admin API left one (its
    versions must be unchanged), else the config's. Returns the config as served and the adapter set.

    Raises AdapterError listing every adapter problem, ConfigError for a state file that does not fit the config.
    """
    path = config.state_path
    state = read_state(path) if path else None
    if state is None:
        infos = check_adapters(config, base_model_dir)
        router = infos.pop(0) if config.router else None
        return config, AdapterSet(router=router, experts=tuple(infos))
    if state.config_adapters != config_adapters(config):
        raise ConfigError(f"state file {path} was left by the admin API for a config serving "
                          f"{state.config_adapters}, but the config now serves {config_adapters(config)}: delete "
                          "the state file to serve the config's adapters, or restore the config")
    log.info("serving the adapters the admin API left in %s (delete it to serve the config's own)", path)
    served = state.served_config(config)
    previous = state.previous_router
    infos = check_adapters(served, base_model_dir, slots=len(served.adapters) + (previous is not None),
                           exact_labels=False)
    problems: list[str] = []
    previous_info = None
    if previous is not None:
        # Its labels may name an expert removed since: rollback refuses then, the restart need not.
        problems, previous_info = check_adapter(previous.config(), Path(previous.path),
                                                base_fingerprint(base_model_dir), config.engine,
                                                served_pixel_limits(config.engine, base_model_dir))
    records = ([state.router] if state.router else []) + state.experts
    for record, info in [*zip(records, infos), *([(previous, previous_info)] if previous else [])]:
        if info.fingerprint != record.fingerprint:
            problems.append(f"{record.name}: the adapter at {record.path} changed since {path} was written (version "
                            f"{record.fingerprint}, now {info.fingerprint}); restore it or delete the state file")
    if problems:
        raise AdapterError(problems)
    router = infos.pop(0) if served.router else None
    return served, AdapterSet(router=router, experts=tuple(infos), previous_router=previous_info)


class ServedNames:
    """Public adapter names -> the versioned names vLLM serves, and the requests each versioned name has in flight.

    Used from the gateway's event loop only: a lookup and its count happen in one step, so an adapter withdrawn
    after a request looked it up still counts that request until it ends.
    """

    def __init__(self, names: Mapping[str, str]) -> None:
        self._names = dict(names)
        self._in_flight: Counter[str] = Counter()

    def served(self, name: str) -> str:
        """The versioned name of a public one; any other name as it is (the base model, an unknown model)."""
        return self._names.get(name, name)

    @contextlib.contextmanager
    def hold(self, name: str) -> Iterator[str]:
        """The versioned name of `name`, counted in flight until the block ends."""
        served = self.served(name)
        self._in_flight[served] += 1
        try:
            yield served
        finally:
            self._in_flight[served] -= 1
            if not self._in_flight[served]:
                del self._in_flight[served]

    def is_public(self, name: str) -> bool:
        """Whether `name` is a published adapter name (the live router or an expert)."""
        return name in self._names

    def in_flight(self, served: str) -> int:
        return self._in_flight[served]

    def publish(self, name: str, served: str) -> None:
        self._names[name] = served

    def withdraw(self, name: str) -> None:
        self._names.pop(name, None)

    def public_models(self, cards: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """vLLM's /v1/models cards as callers see them: published versions under their public names, versions
        not (or no longer) published left out, the base model as it is."""
        public = {served: name for name, served in self._names.items()}
        return [{**card, "id": public.get(card.get("id"), card.get("id"))} for card in cards
                if card.get("id") in public or "@" not in str(card.get("id"))]
