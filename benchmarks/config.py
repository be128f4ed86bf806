"""BenchConfig: every knob of one benchmark run, with its default and what it means.

The deployment itself (model, adapters, engine) comes from the deployment YAML (lora_router.deployment); this file
only says how hard, how long and in which ways to load it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lora_router.configuration import ConfigError, check_types

# The seed's routing-dataset flags (--train-images-calendar 27, --train-images-claim-window 3000,
# --train-images-provider-select 3000): the class mix production traffic is assumed to have.
SEED_CLASS_MIX = {"calendar": 27.0, "claim-window": 3000.0, "provider-select": 3000.0}


@dataclass
class BenchConfig:
    """How one benchmark run loads the deployment."""

    base_url: str | None = field(default=None, metadata={
        "help": "OpenAI API root the client-side phases talk to on a running deployment (http://host:port/v1); "
                "None starts vLLM and the gateway from the deployment config (client-side phases then talk to vLLM "
                "directly) and stops them at the end."})
    gateway_url: str | None = field(default=None, metadata={
        "help": "With base_url: the running routing gateway's API root (http://host:port/v1) for the gateway "
                "phases (model auto); None skips them. Ignored when the benchmark starts the server."})
    seed: int = field(default=0, metadata={
        "help": "Seed of the screenshots, the class draw and the Poisson arrivals; same seed, same requests."})
    concurrencies: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32], metadata={
        "help": "Closed-loop sweep of the two-stage path: requests in flight at once."})
    min_requests: int = field(default=16, metadata={
        "help": "Fewest measured screenshots in one closed-loop phase (each round sends them again)."})
    requests_per_slot: int = field(default=4, metadata={
        "help": "Measured screenshots per concurrency slot: a phase at concurrency c sends "
                "max(min_requests, requests_per_slot * c); in an interleaved group at c > 1, twice that in two "
                "turns."})
    per_expert_requests: int = field(default=6, metadata={
        "help": "Screenshots of each class for the per-expert routing overhead at concurrency 1 (0 skips it)."})
    compare_concurrency: int = field(default=16, metadata={
        "help": "Concurrency of the side-by-side phases (router-only, expert-only, modes, resolutions, base)."})
    warmup_requests: int = field(default=2, metadata={
        "help": "Unmeasured screenshots per request kind before the first measured phase, sent at once; then as "
                "many as compare_concurrency, at once (0: no warm-up)."})
    request_rate: float | None = field(default=None, metadata={
        "help": "Open-loop Poisson arrival rate in screenshots/s; None: 0.7 x the best two-stage throughput of the "
                "closed-loop phases before it."})
    poisson_requests: int = field(default=64, metadata={
        "help": "Screenshots sent open loop (0 skips the open-loop phase)."})
    class_mix: dict[str, float] = field(default_factory=lambda: dict(SEED_CLASS_MIX), metadata={
        "help": "Relative frequency of each screenshot class (an expert name and a screen generator kind), e.g. "
                "calendar=27,claim-window=3000."})
    router_mode: Literal["choice", "one-token"] | None = field(default=None, metadata={
        "help": "Router mode of the two-stage path ('choice' or 'one-token'); None: the deployment client's "
                "router_mode as the client resolves it. The other mode is measured beside it."})
    router_max_pixels: int = field(default=80 * 32 * 32, metadata={
        "help": "Pixel budget of reduced-resolution router images (Qwen3-VL: 32x32 px per image token)."})
    expert_max_tokens: int | None = field(default=None, metadata={
        "help": "Longest expert answer; None: each screenshot's gold answer length in tokens + 1, the length a "
                "trained expert writes (random stand-ins seldom stop earlier)."})
    peer_requests: int = field(default=32, metadata={
        "help": "Requests `vllm bench serve` sends on the expert-only path (0 skips it)."})
    hf_requests: int = field(default=24, metadata={
        "help": "Screenshots per transformers + PEFT baseline and round, one at a time (0 skips them); at 8 (about "
                "1.3 s) the single-load baseline's rounds spread 5.1-6.7 screenshots/s within one run."})
    cpu_threads: int | None = field(default=None, metadata={
        "help": "CPU deployments: OpenMP threads of the vLLM worker the benchmark starts (set as the deployment's "
                "engine.cpu_threads) and of the transformers baselines; None: the deployment's engine.cpu_threads, "
                "else cores - 1, at least 1 (vLLM's own thread binding keeps one core for its scheduler; more "
                "threads than free cores stall every OpenMP barrier)."})
    rounds: int = field(default=5, metadata={
        "help": "Rounds of the compared phases (gateway vs client-side, one-token vs choice, two-stage vs "
                "expert-only, mixed vs base), spread over the run; each target is judged on its median over them."})
    timeout_s: float = field(default=300.0, metadata={
        "help": "Seconds one HTTP request may take before it counts as an error."})

    def __post_init__(self) -> None:
        check_types(self)
        if not self.concurrencies or min(self.concurrencies) < 1:
            raise ConfigError(f"concurrencies must be >= 1, got {self.concurrencies}")
        self.concurrencies = sorted(set(self.concurrencies))
        for name in ("min_requests", "requests_per_slot", "compare_concurrency", "router_max_pixels", "rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("per_expert_requests", "warmup_requests", "poisson_requests", "peer_requests", "hf_requests"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.request_rate is not None and self.request_rate <= 0:
            raise ConfigError(f"request_rate must be > 0, got {self.request_rate}")
        if not self.class_mix or min(self.class_mix.values()) < 0 or sum(self.class_mix.values()) <= 0:
            raise ConfigError(f"class_mix needs non-negative weights with a positive sum, got {self.class_mix}")
        if self.expert_max_tokens is not None and self.expert_max_tokens < 1:
            raise ConfigError(f"expert_max_tokens must be >= 1, got {self.expert_max_tokens}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ConfigError(f"cpu_threads must be >= 1, got {self.cpu_threads}")
        if self.timeout_s <= 0:
            raise ConfigError(f"timeout_s must be > 0, got {self.timeout_s}")

    def requests_at(self, concurrency: int) -> int:
        """Measured screenshots of a closed-loop phase at `concurrency`."""
        return max(self.min_requests, self.requests_per_slot * concurrency)
