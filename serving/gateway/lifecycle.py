"""The adapter lifecycle on a running deployment: what vLLM serves, under which versioned names, and the admin
operations that change it without dropping a request.

    add_adapter      check (as at start), load into vLLM, warm up, probe against the base model, save, publish
    remove_adapter   withdraw the public name, let its in-flight requests finish, unload
    load_candidate   a new router version beside the live one; a fraction of auto traffic is shadowed to it
    promote          the candidate becomes live in one step; the version before it stays loaded for rollback
    rollback         the previous version becomes live again (twice: back where it was)

Every operation checks everything before it changes anything, writes the state file before it swaps the live
state (a failed write changes nothing), and swaps in one step of the event loop. A request reads the live policy
once, so a request that started routing on one router version finishes on it. Operations run one at a time.

The state file is the fleet's desired state when the replicas share it (gateway.state_file on a shared folder):
an operation first syncs to it, then writes its change as the next version only if no other replica wrote one
meanwhile (else 409 state_conflict, and what it loaded is unloaded again); every gateway.sync_interval_s each
replica syncs: it loads what the file adds, swaps routers as it says, and drains and unloads what it removes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp

from lora_router.deployment import AdapterConfig, ConfigError, DeploymentConfig
from lora_router.routing import RoutingConfigError, RoutingPolicy
from serving.adapters import AdapterInfo, check_adapter, router_label_problems
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.protocol import GatewayError
from serving.gateway.shadow import ShadowRouter
from serving.gateway.upstream import Upstream, UpstreamError
from serving.lifecycle import (
    AdapterRecord,
    AdapterSet,
    PathRefused,
    ServedNames,
    StateConflict,
    read_state,
    resolve_adapter_path,
    update_state,
)
from serving.probe import ProbeError, warm_up_and_probe

log = logging.getLogger(__name__)

# Seconds between checks of a draining adapter's in-flight requests.
_DRAIN_POLL_S = 0.05


def _describe(info: AdapterInfo) -> dict[str, Any]:
    """An adapter version as the admin API shows it."""
    out: dict[str, Any] = {"name": info.name, "version": info.fingerprint, "served_as": info.served_as,
                           "path": str(info.path), "rank": info.rank}
    if info.labels is not None:
        out["labels"] = list(info.labels)
    if info.prompt:
        out["prompt"] = info.prompt
    return out


class AdapterLifecycle:
    """The adapters one gateway serves and the operations that change them.

    `config` is the deployment as served, its engine.max_loras and engine.max_lora_rank those vLLM runs with (the
    launcher sets them); `upstream` the vLLM it changes; `adapters` is what vLLM serves at start; `base` the base
    model's fingerprint (adapter manifests must name it); `config_adapters` the config's own router and experts as
    the state file records them; `replica` names this replica (host:port) in what the admin API answers.
    """

    def __init__(self, config: DeploymentConfig, upstream: Upstream, adapters: AdapterSet, metrics: GatewayMetrics,
                 *, base: str | None, config_adapters: list[str], replica: str = socket.gethostname()) -> None:
        self.config = config
        self.upstream = upstream
        self.adapters = adapters
        self.base = base
        self.config_adapters = config_adapters
        self.candidate: AdapterInfo | None = None
        self.shadow = ShadowRouter(upstream, metrics, config.gateway.shadow_fraction, config.gateway.max_in_flight)
        self.names = ServedNames(adapters.public_names())
        self.prompts = {e.name: e.prompt for e in adapters.experts}
        # Every loaded router version's policy, by versioned name: live, previous and candidate.
        self.policies = {r.served_as: self._policy(r) for r in (adapters.router, adapters.previous_router) if r}
        # The state file version this replica serves; a candidate in the file is loaded by the first sync.
        state = read_state(config.state_path) if config.state_path else None
        self.version = state.version if state and state.candidate is None else -1 if state else 0
        self.replica = replica
        self._lock = asyncio.Lock()

    # -- what requests read

    @property
    def policy(self) -> RoutingPolicy:
        """The live router version's policy; 400 when the deployment has no router."""
        if self.adapters.router is None:
            raise GatewayError(400, "the deployment has no router adapter, so model "
                                    f"{self.config.gateway.auto_model!r} cannot route", param="model", code="no_router")
        return self.policies[self.adapters.router.served_as]

    def served(self) -> list[AdapterInfo]:
        """Every adapter vLLM must hold (a restart loads these): live and previous router, candidate, experts."""
        return self.adapters.all() + ([self.candidate] if self.candidate else [])

    # -- lifecycle

    async def close(self) -> None:
        await self.shadow.cancel()

    async def sync_forever(self) -> None:
        """Converge to the state file every gateway.sync_interval_s (a task the gateway runs while open)."""
        while True:
            await asyncio.sleep(self.config.gateway.sync_interval_s)
            try:
                async with self._lock:
                    await self._sync()
            except (GatewayError, ConfigError) as exc:  # vLLM restarting, a file not there yet: the next round retries
                log.warning("syncing to the fleet's state failed, retrying in %g s: %s",
                            self.config.gateway.sync_interval_s, getattr(exc, "message", exc))

    async def resolve(self) -> None:
        """Resolve every router version's policy (one-token routing needs the labels' first tokens); after each
        (re)start of vLLM."""
        for served, policy in list(self.policies.items()):
            self.policies[served] = await self._resolved(policy)

    # -- admin operations

    async def add_adapter(self, name: str, path: str, prompt: str) -> dict[str, Any]:
        """Load an expert and make it visible in /v1/models and routable."""
        async with self._lock:
            await self._sync()
            adapter = self._new_expert(name, path, prompt)
            folder = self._resolve_path(path)
            info = self._checked(dataclasses.replace(adapter, path=str(folder)), folder)
            if info.labels is not None:
                raise GatewayError(400, f"{name}: {folder} is a router (its manifest has labels); load it with "
                                        "POST /admin/router/candidate", code="adapter_refused")
            self._check_free_slot()
            await self._load(info)
            adapters = dataclasses.replace(self.adapters, experts=self.adapters.experts + (info,))
            await self._commit_or_unload(adapters, self.candidate, info)
            self.adapters = adapters
            self.prompts[name] = prompt
            self.names.publish(name, info.served_as)
            log.info("added expert %s (%s) from %s", name, info.served_as, folder)
            return {"added": _describe(info), **self.state()}

    async def remove_adapter(self, name: str) -> dict[str, Any]:
        """Withdraw an expert, let its in-flight requests finish, then unload it."""
        async with self._lock:
            await self._sync()
            info = self.adapters.expert(name)
            if info is None:
                raise GatewayError(404, f"no expert named {name!r} is loaded (experts: "
                                        f"{', '.join(e.name for e in self.adapters.experts) or 'none'})",
                                   param="name", code="unknown_adapter")
            for role, router in (("live", self.adapters.router), ("candidate", self.candidate)):
                if router is not None and name in (router.labels or ()):
                    raise GatewayError(409, f"{name} is a label of the {role} router {router.served_as}: it would "
                                            "route requests to nothing; promote or roll back to a router without "
                                            "it first", code="adapter_in_use")
            if self.config.client.fallback == f"expert:{name}":
                raise GatewayError(409, f"{name} is the fallback (client.fallback): it cannot be removed",
                                   code="adapter_in_use")
            self._commit(self._without_expert(name), self.candidate)
            drained = await self._withdraw_expert(info)
            log.info("removed expert %s (%s)", name, info.served_as)
            return {"removed": _describe(info), "drained": drained, **self.state()}

    async def load_candidate(self, path: str) -> dict[str, Any]:
        """Load a router version beside the live one and start shadowing auto traffic to it."""
        async with self._lock:
            await self._sync()
            live = self.adapters.router
            if live is None:
                raise GatewayError(409, "the deployment has no live router to compare a candidate with",
                                   code="no_router")
            if self.candidate is not None:
                raise GatewayError(409, f"a candidate router is loaded already ({self.candidate.served_as}): "
                                        "promote or discard it first", code="candidate_loaded")
            folder = self._resolve_path(path)
            info = self._checked(AdapterConfig(name=live.name, path=str(folder)), folder,
                                 [e.name for e in self.adapters.experts])
            for role, version in (("live", live), ("previous", self.adapters.previous_router)):
                if version is not None and version.served_as == info.served_as:
                    raise GatewayError(409, f"{folder} is the {role} router version {info.served_as} already",
                                       code="candidate_loaded")
            try:
                policy = self._policy(info)
            except RoutingConfigError as exc:
                raise GatewayError(400, f"{live.name}: {exc}", code="adapter_refused") from None
            self._check_free_slot()
            await self._load(info)
            try:
                policy = await self._resolved(policy)
                self._commit(self.adapters, info)
            except GatewayError:
                await self._unload(info.served_as)
                raise
            self.policies[info.served_as] = policy
            self.shadow.start(info.served_as, policy, self.policy)
            self.candidate = info
            log.info("candidate router %s loaded from %s; shadowing %.0f%% of auto requests", info.served_as, folder,
                     100 * self.config.gateway.shadow_fraction)
            return {"candidate": _describe(info), **self.state()}

    async def discard_candidate(self) -> dict[str, Any]:
        """Stop shadowing and unload the candidate router."""
        async with self._lock:
            await self._sync()
            candidate = self._candidate()
            self._commit(self.adapters, None)
            self.candidate = None
            await self.shadow.cancel()
            await self._unload(candidate.served_as)
            self.policies.pop(candidate.served_as, None)
            return {"discarded": _describe(candidate), **self.state()}

    async def promote(self) -> dict[str, Any]:
        """The candidate becomes the live router; the live one stays loaded as the previous version."""
        async with self._lock:
            await self._sync()
            candidate = self._candidate()
            retired = self.adapters.previous_router
            adapters = dataclasses.replace(self.adapters, router=candidate, previous_router=self.adapters.router)
            self._commit(adapters, None)
            self._go_live(adapters)
            self.candidate = None
            self.shadow.end()
            log.info("promoted router %s (previous: %s)", candidate.served_as, adapters.previous_router.served_as)
            if retired is not None:
                await self._drain(retired.served_as)
                await self._unload(retired.served_as)
                self.policies.pop(retired.served_as, None)
            return {"promoted": _describe(candidate), "unloaded": _describe(retired) if retired else None,
                    **self.state()}

    async def rollback(self) -> dict[str, Any]:
        """The previous router version becomes live again; the live one becomes the previous."""
        async with self._lock:
            await self._sync()
            previous = self.adapters.previous_router
            if previous is None:
                raise GatewayError(409, "there is no previous router version to roll back to", code="no_previous")
            missing = [label for label in previous.labels or () if self.adapters.expert(label) is None]
            if missing:
                raise GatewayError(409, f"the previous router {previous.served_as} routes to {missing}, which are "
                                        "no longer loaded: add them back first", code="adapter_missing")
            adapters = dataclasses.replace(self.adapters, router=previous, previous_router=self.adapters.router)
            self._commit(adapters, self.candidate)
            self._go_live(adapters)
            log.info("rolled back to router %s", previous.served_as)
            return {"live": _describe(previous), **self.state()}

    def state(self) -> dict[str, Any]:
        """What is served: router versions, experts and LoRA slots."""
        version = (lambda info: _describe(info) if info else None)
        return {"router": version(self.adapters.router), "previous_router": version(self.adapters.previous_router),
                "candidate": version(self.candidate), "experts": [_describe(e) for e in self.adapters.experts],
                "slots": {"used": len(self.served()), "total": self.config.engine.max_loras},
                "state_version": self.version, "replica": self.replica}

    def shadow_report(self) -> dict[str, Any]:
        """The candidate's (or the last candidate's) comparison with the live router."""
        return {**self.shadow.report(), "live": self.adapters.router.served_as if self.adapters.router else None,
                "replica": self.replica}

    # -- steps

    def _policy(self, router: AdapterInfo) -> RoutingPolicy:
        return RoutingPolicy.of(self.config, router_name=router.served_as, labels=router.labels,
                                calibration=router.calibration)

    async def _resolved(self, policy: RoutingPolicy) -> RoutingPolicy:
        return await policy.resolved(lambda body: self._post_json("/tokenize", body))

    def _candidate(self) -> AdapterInfo:
        if self.candidate is None:
            raise GatewayError(409, "there is no candidate router: load one with POST /admin/router/candidate",
                               code="no_candidate")
        return self.candidate

    def _go_live(self, adapters: AdapterSet) -> None:
        """Swap in a new live router: one step, so every request sees the old set or the new one."""
        self.adapters = adapters
        if adapters.router is not None:
            self.names.publish(adapters.router.name, adapters.router.served_as)

    def _without_expert(self, name: str) -> AdapterSet:
        return dataclasses.replace(self.adapters, experts=tuple(e for e in self.adapters.experts if e.name != name))

    async def _withdraw_expert(self, info: AdapterInfo) -> bool:
        """Withdraw an expert's public name, let its in-flight requests finish, unload it; whether it drained."""
        self.adapters = self._without_expert(info.name)
        self.names.withdraw(info.name)
        self.prompts.pop(info.name, None)
        drained = await self._drain(info.served_as)
        await self._unload(info.served_as)
        return drained

    async def _sync(self) -> None:
        """Serve what the state file says, if another replica moved it on: experts first (a router's labels name
        them), then router versions, each loaded once whatever its role, then unload what no role keeps."""
        path = self.config.state_path
        desired = read_state(path) if path else None
        if desired is None or desired.version == self.version:
            return
        log.info("syncing to the fleet's state version %d (this replica served %d)", desired.version, self.version)
        wanted = {record.name: record for record in desired.experts}
        for info in self.adapters.experts:
            record = wanted.get(info.name)
            if record is None or record.fingerprint != info.fingerprint:
                await self._withdraw_expert(info)
        for record in desired.experts:
            if self.adapters.expert(record.name) is None:
                info = self._checked(record.config(), Path(record.path))
                await self._load(info)
                self.adapters = dataclasses.replace(self.adapters, experts=self.adapters.experts + (info,))
                self.prompts[info.name] = info.prompt
                self.names.publish(info.name, info.served_as)
        order = [record.name for record in desired.experts]
        experts = tuple(sorted(self.adapters.experts, key=lambda e: order.index(e.name)))
        loaded = {i.fingerprint: i for i in (self.adapters.router, self.adapters.previous_router, self.candidate) if i}
        roles: dict[str, AdapterInfo | None] = {}
        for role, record in (("router", desired.router), ("previous", desired.previous_router),
                             ("candidate", desired.candidate)):
            info = loaded.get(record.fingerprint) if record else None
            if record is not None and info is None:
                # Rollback checks the previous version's labels; a restart and a sync need not.
                info = self._checked(record.config(), Path(record.path),
                                     None if role == "previous" else [e.name for e in experts])
                await self._load(info)
                self.policies[info.served_as] = await self._resolved(self._policy(info))
                loaded[record.fingerprint] = info
            roles[role] = info
        kept = {i.served_as for i in roles.values() if i}
        retired = [i for i in loaded.values() if i.served_as not in kept]
        self._go_live(dataclasses.replace(self.adapters, router=roles["router"], previous_router=roles["previous"],
                                          experts=experts))
        candidate = roles["candidate"]
        if candidate is None:
            self.shadow.end()
        elif self.candidate is None or self.candidate.served_as != candidate.served_as:
            self.shadow.start(candidate.served_as, self.policies[candidate.served_as], self.policy,
                              desired.shadow_fraction)
        self.candidate = candidate
        for info in retired:
            await self._drain(info.served_as)
            await self._unload(info.served_as)
            self.policies.pop(info.served_as, None)
        self.version = desired.version
        log.info("serving the fleet's state version %d: router %s, experts %s", self.version,
                 roles["router"].served_as if roles["router"] else None, ", ".join(order) or "none")

    def _new_expert(self, name: str, path: str, prompt: str) -> AdapterConfig:
        """The expert an add call describes, its name valid and free."""
        try:
            adapter = AdapterConfig(name=name, path=path, prompt=prompt)
        except ConfigError as exc:
            raise GatewayError(400, str(exc), param="name", code="bad_name") from None
        taken = {self.config.model.served_name: "the base model", self.config.gateway.auto_model: "the routing model",
                 **{e.name: "a loaded expert" for e in self.adapters.experts}}
        if self.adapters.router is not None:
            taken[self.adapters.router.name] = "the router"
        if name in taken:
            raise GatewayError(409, f"{name!r} is {taken[name]} already: remove it first, or pick another name",
                               param="name", code="name_taken")
        return adapter

    def _resolve_path(self, path: str) -> Path:
        try:
            return resolve_adapter_path(path, self.config.adapter_dirs, self.config.root)
        except PathRefused as exc:
            raise GatewayError(403, str(exc), param="path", code="path_refused") from None

    def _checked(self, adapter: AdapterConfig, folder: Path, router_for: list[str] | None = None) -> AdapterInfo:
        """Start-up's checks on one adapter (and, for a router, that every label names one of `router_for`)."""
        problems, info = check_adapter(adapter, folder, self.base, self.config.engine)
        if router_for is not None and not problems:
            problems = router_label_problems(adapter.name, folder, router_for, exact=False)
        if problems:
            raise GatewayError(400, "; ".join(problems), param="path", code="adapter_refused")
        return info

    def _check_free_slot(self) -> None:
        served = self.served()
        if len(served) >= self.config.engine.max_loras:
            raise GatewayError(409, f"all {self.config.engine.max_loras} LoRA slots are taken "
                                    f"({', '.join(a.served_as for a in served)}): remove an expert or discard the "
                                    "candidate, or restart with a larger engine.lora_headroom or engine.max_loras",
                               code="no_free_slot")

    async def _load(self, info: AdapterInfo) -> None:
        """Load into vLLM, warm up and probe against the base model; unloaded again if any of it fails."""
        await self._post("/v1/load_lora_adapter", {"lora_name": info.served_as, "lora_path": str(info.path)})
        try:
            noop = await warm_up_and_probe(self.upstream.session, self.upstream.root + "/v1", self.config.model.served_name,
                                           [info.served_as])
        except (ProbeError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            await self._unload(info.served_as)
            raise GatewayError(502, f"{info.name}: warm-up failed: {exc}", type="server_error",
                               code="upstream_failed") from None
        if noop:
            await self._unload(info.served_as)
            raise GatewayError(400, f"{info.name}: answers the probe exactly as the base model does: it changes "
                                    "nothing (all-zero LoRA B, or weights vLLM could not map onto the model)",
                               param="path", code="adapter_noop")

    async def _unload(self, served: str) -> None:
        try:
            await self._post("/v1/unload_lora_adapter", {"lora_name": served})
        except GatewayError as exc:  # what callers see is already consistent; vLLM keeps a stray copy
            log.warning("unloading %s from vLLM failed: %s", served, exc.message)

    async def _drain(self, served: str) -> bool:
        """Wait until no request uses `served` (at most gateway.drain_timeout_s); whether it drained."""
        deadline = time.monotonic() + self.config.gateway.drain_timeout_s
        while self.names.in_flight(served):
            if time.monotonic() > deadline:
                log.warning("%s still has %d requests in flight after %.0f s; unloading it anyway", served,
                            self.names.in_flight(served), self.config.gateway.drain_timeout_s)
                return False
            await asyncio.sleep(_DRAIN_POLL_S)
        return True

    def _commit(self, adapters: AdapterSet, candidate: AdapterInfo | None) -> None:
        """Write the state a restart (and, on a shared folder, every replica) comes back to, as the next version;
        a failure is an error that changes nothing."""
        path = self.config.state_path
        if path is None:
            return
        state = dataclasses.replace(adapters.state(self.config_adapters),
                                    candidate=AdapterRecord.of(candidate) if candidate else None,
                                    shadow_fraction=self.shadow.fraction if candidate else None)
        try:
            self.version = update_state(path, max(self.version, 0), state).version
        except StateConflict as exc:
            raise GatewayError(409, f"{exc}: another replica changed the fleet at the same time; nothing changed "
                                    "here, retry", code="state_conflict") from None
        except OSError as exc:
            raise GatewayError(500, f"the state file {path} could not be written ({exc}); nothing changed",
                               type="server_error", code="state_not_saved") from None

    async def _commit_or_unload(self, adapters: AdapterSet, candidate: AdapterInfo | None,
                                loaded: AdapterInfo) -> None:
        try:
            self._commit(adapters, candidate)
        except GatewayError:
            await self._unload(loaded.served_as)
            raise

    # -- upstream

    async def _post(self, path: str, body: dict[str, Any]) -> bytes:
        """POST one step of an operation to vLLM; vLLM's refusal is the step that failed (502)."""
        try:
            return await self.upstream.read("POST", path, body)
        except UpstreamError as exc:
            raise GatewayError(502, f"vLLM answered {path} with {exc.upstream_status}: {exc.upstream_message}",
                               type="server_error", code="upstream_failed") from None

    async def _post_json(self, path: str, body: dict[str, Any]) -> Any:
        try:
            return json.loads(await self._post(path, body))
        except ValueError:
            raise GatewayError(502, f"vLLM answered {path} with no JSON", type="server_error",
                               code="upstream_failed") from None
