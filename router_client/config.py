"""ClientConfig: everything RouterClient needs, typed and checked; usually built from the deployment config.

    cfg = ClientConfig.from_deployment(load_config("configs/tiny-cpu.yaml"), base_url="http://host:8000/v1")

Precedence: _constants defaults < values derived from the deployment < its `client:` section < overrides.
Types are checked by lora_router.configuration.check_types, as for every config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lora_router import routing
from lora_router.configuration import check_types
from lora_router.deployment import DeploymentConfig
from lora_router.manifest import AdapterManifest
from lora_router.openai_wire import root_url
from router_client import _constants as C
from router_client.errors import ClientConfigError


@dataclass
class ClientConfig:
    """Settings of one RouterClient."""

    base_url: str = field(metadata={
        "help": "OpenAI-compatible API root of the vLLM server, e.g. http://127.0.0.1:8000/v1; /tokenize is "
                "called at the server root (this URL without its trailing /v1)."})
    router_name: str = field(metadata={"help": "Served name of the router adapter (the request's `model`)."})
    labels: list[str] = field(metadata={"help": "Expert names the router answers with, in the router's order."})
    base_name: str = field(default="base", metadata={
        "help": "Served name of the base model without adapter (fallback target 'base')."})
    expert_prompts: dict[str, str] = field(default_factory=dict, metadata={
        "help": "Default task prompt per expert, used when a call gives none."})
    served_names: dict[str, str] = field(default_factory=dict, metadata={
        "help": "Public name -> the name the server serves it under, for a client talking straight to the vLLM "
                "behind a gateway (it serves versioned names, name@fingerprint); names not listed are sent as "
                "they are."})
    auto_model: str = field(default="auto", metadata={
        "help": "Model name the routing gateway routes (process_via_gateway's requests name it)."})
    api_key: str | None = field(default=None, repr=False, metadata={
        "help": "Sent as 'Authorization: Bearer <key>'; None sends no Authorization header."})
    router_mode: str = field(default=C.DEFAULT_ROUTER_MODE, metadata={
        "help": "'choice' (constrained to the labels, confidence from the answer's log-probabilities), "
                "'one-token' (one unconstrained token, probabilities from its top log-probabilities; needs "
                "labels whose first tokens differ) or 'auto' (one-token when valid, else choice)."})
    fallback: str = field(default=C.DEFAULT_FALLBACK, metadata={
        "help": "For an answer that is no label or below min_confidence: 'error' (raise), 'base' (run the "
                "task on the base model) or 'expert:<name>' (run it on that expert)."})
    min_confidence: float = field(default=C.DEFAULT_MIN_CONFIDENCE, metadata={
        "help": "Routes below this confidence (0-1) go to the fallback (from_deployment: default the router "
                "manifest's calibrated threshold)."})
    temperature: float = field(default=1.0, metadata={
        "help": "One-token label scores are divided by it before the softmax (from_deployment: default the router "
                "manifest's calibrated temperature)."})
    base_prompt: str = field(default=C.DEFAULT_BASE_PROMPT, metadata={
        "help": "Task prompt for the base model when a route falls back to it and the call gives none."})
    expert_max_tokens: int = field(default=C.DEFAULT_EXPERT_MAX_TOKENS, metadata={
        "help": "Longest expert answer in tokens."})
    max_pixels: int | None = field(default=None, metadata={
        "help": "Images with more pixels are downscaled (aspect kept) before sending; None sends them as is."})
    max_image_pixels: int = field(default=C.DEFAULT_MAX_IMAGE_PIXELS, metadata={
        "help": "Images with more pixels are refused before decoding (decompression bombs)."})
    timeout_s: float = field(default=C.DEFAULT_TIMEOUT_S, metadata={
        "help": "Total seconds for one HTTP attempt, connection included."})
    connect_timeout_s: float = field(default=C.DEFAULT_CONNECT_TIMEOUT_S, metadata={
        "help": "Seconds to get a connection (pool wait included)."})
    read_timeout_s: float = field(default=C.DEFAULT_READ_TIMEOUT_S, metadata={
        "help": "Seconds without any data from the server before an attempt fails."})
    max_retries: int = field(default=C.DEFAULT_MAX_RETRIES, metadata={
        "help": "Retries after connection errors, timeouts, 429 and 5xx (never other 4xx)."})
    max_connections: int = field(default=C.DEFAULT_MAX_CONNECTIONS, metadata={
        "help": "Open connections to the server at most."})

    def __post_init__(self) -> None:
        check_types(self, "client", error=ClientConfigError)
        if not self.base_url.startswith(("http://", "https://")):
            raise ClientConfigError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        self.base_url = self.base_url.rstrip("/")
        if not self.labels:
            raise ClientConfigError("labels is empty: the deployment has no experts")
        if len(set(self.labels)) != len(self.labels):
            raise ClientConfigError(f"labels must be unique, got {self.labels}")
        if self.base_name in self.labels or self.router_name in self.labels:
            raise ClientConfigError("base_name and router_name must differ from every label")
        unknown = sorted(set(self.expert_prompts) - set(self.labels))
        if unknown:
            raise ClientConfigError(f"expert_prompts names unknown expert(s): {', '.join(unknown)}")
        if self.router_mode not in routing.MODE_SETTINGS:
            raise ClientConfigError(f"router_mode must be one of {', '.join(routing.MODE_SETTINGS)}, "
                                    f"got {self.router_mode!r}")
        _ = self.fallback_target  # raises ClientConfigError for a fallback that names no model
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ClientConfigError(f"min_confidence must be within 0-1, got {self.min_confidence}")
        if self.temperature <= 0:
            raise ClientConfigError(f"temperature must be > 0, got {self.temperature}")
        for name in ("timeout_s", "connect_timeout_s", "read_timeout_s"):
            if getattr(self, name) <= 0:
                raise ClientConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name, least in (("max_retries", 0), ("max_connections", 1), ("expert_max_tokens", 1),
                            ("max_image_pixels", 1)):
            if getattr(self, name) < least:
                raise ClientConfigError(f"{name} must be >= {least}, got {getattr(self, name)}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ClientConfigError(f"max_pixels must be >= 1 or None, got {self.max_pixels}")

    @property
    def fallback_target(self) -> str | None:
        """The model a fallback runs on (base_name or an expert), or None for fallback 'error'."""
        try:
            return routing.fallback_target(self.fallback, self.labels, self.base_name)
        except routing.RoutingConfigError as exc:
            raise ClientConfigError(str(exc)) from None

    def served(self, name: str) -> str:
        """The `model` to send for a public adapter (or base model) name."""
        return self.served_names.get(name, name)

    @property
    def server_root(self) -> str:
        """The server root (where /tokenize and /health live): base_url without a trailing /v1."""
        return self.base_url.removesuffix("/v1")

    @classmethod
    def from_deployment(cls, dep: DeploymentConfig, **overrides: Any) -> ClientConfig:
        """A client config for a deployment: server address, API key, served names (the gateway's auto model
        too), labels, expert prompts and engine.max_pixels from `dep`, then its `client:` section, then
        `overrides` (any field).

        Raises ClientConfigError for unknown override fields, a deployment without router, or an engine port of 0
        (picked at start, so unknown here) without a base_url override. The `client:` section itself was checked
        when the deployment was loaded (lora_router.deployment.ClientSettings).
        """
        if dep.router is None:
            raise ClientConfigError("the deployment has no router adapter")
        known = {f.name for f in dataclasses.fields(cls)}
        section = dep.client.given()
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ClientConfigError(f"unknown ClientConfig field(s): {', '.join(unknown)}")
        values: dict[str, Any] = {
            "router_name": dep.router.name,
            "base_name": dep.model.served_name,
            "labels": dep.labels,
            "expert_prompts": {e.name: e.prompt for e in dep.experts if e.prompt},
            "auto_model": dep.gateway.auto_model,
            "api_key": dep.engine.api_key,
            "max_pixels": dep.engine.max_pixels,
            **section,
            **_calibrated(dep),
            **overrides,
        }
        if "base_url" not in values:
            if dep.engine.port == 0:
                raise ClientConfigError("engine.port is 0 (picked when the server starts): pass base_url")
            values["base_url"] = root_url(dep.engine.host, dep.engine.port) + "/v1"
        return cls(**values)



def _calibrated(dep: DeploymentConfig) -> dict[str, float]:
    """min_confidence and temperature: the `client:` section's, else the router manifest's calibration."""
    try:
        calibration = AdapterManifest.read(dep.adapter_path(dep.router)).calibration
    except (FileNotFoundError, ValueError):
        calibration = None  # no manifest here (a remote deployment): the section's values or the defaults
    try:
        return routing.calibrated_settings(dep.client.min_confidence, dep.client.temperature, calibration)
    except routing.RoutingConfigError as exc:
        raise ClientConfigError(str(exc)) from None
