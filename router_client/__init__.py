"""Async client of a router + LoRA experts deployment on vLLM: route a screenshot, then run the chosen expert.

    from router_client import ClientConfig, RouterClient
    from lora_router.deployment import load_config

    cfg = ClientConfig.from_deployment(load_config("configs/tiny-cpu.yaml"))
    async with RouterClient(cfg) as client:
        result = await client.process("screen.png")

Command lines: `python -m router_client` (one screenshot), `python -m router_client.batch` (many) and
`python -m benchmarks.validate_served` (a served router's accuracy on a held-out set).
"""

from lora_router.images import PreparedImage
from router_client.client import RouterClient, prepare_image
from router_client.config import ClientConfig
from router_client.errors import (
    APIConnectionError,
    APIResponseError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ClientConfigError,
    InternalServerError,
    InvalidImageError,
    LowConfidenceError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RouterClientError,
    UnknownExpertError,
)
from router_client.types import (
    APIResponse,
    ClientStats,
    ExpertResult,
    ProcessResult,
    RouteDecision,
    StageTimings,
    ToolCall,
)

__all__ = [
    "APIConnectionError", "APIResponse", "APIResponseError", "APIStatusError", "APITimeoutError",
    "AuthenticationError", "BadRequestError", "ClientConfig", "ClientConfigError", "ClientStats", "ExpertResult",
    "InternalServerError", "InvalidImageError", "LowConfidenceError", "NotFoundError", "PermissionDeniedError",
    "PreparedImage", "ProcessResult", "RateLimitError", "RouteDecision", "RouterClient", "RouterClientError",
    "StageTimings", "ToolCall", "UnknownExpertError", "prepare_image",
]
