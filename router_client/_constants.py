"""Every default of the client in one place; ClientConfig fields and per-call arguments override them."""

from __future__ import annotations

from lora_router import deployment, images, routing

# Timeouts in seconds. vLLM sends nothing until a non-streamed answer is complete, so the read timeout
# bounds queueing plus generation of one request.
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_READ_TIMEOUT_S = 300.0

# Retries of connection errors, timeouts, 429 and 5xx: attempt n (from 0) waits
# min(INITIAL * 2**n, MAX) seconds, less up to 25 % jitter.
DEFAULT_MAX_RETRIES = 2
INITIAL_RETRY_DELAY_S = 0.5
MAX_RETRY_DELAY_S = 8.0
# A server's Retry-After is honoured up to this many seconds.
MAX_RETRY_AFTER_S = 60.0

# Open connections to the server at most (aiohttp TCPConnector limit).
DEFAULT_MAX_CONNECTIONS = 64

# Router mode setting (lora_router.routing.MODE_SETTINGS) and fallback policy.
DEFAULT_ROUTER_MODE = deployment.DEFAULT_ROUTER_MODE
DEFAULT_FALLBACK = deployment.DEFAULT_FALLBACK
DEFAULT_MIN_CONFIDENCE = routing.DEFAULT_MIN_CONFIDENCE

# Longest expert answer in tokens.
DEFAULT_EXPERT_MAX_TOKENS = 512
# Task prompt for the base model when a route falls back to it and the caller gave none.
DEFAULT_BASE_PROMPT = deployment.DEFAULT_BASE_PROMPT

# Images: refuse more pixels than this before decoding (decompression bombs); the one image preparation's cap.
DEFAULT_MAX_IMAGE_PIXELS = images.DEFAULT_MAX_IMAGE_PIXELS

# Batch CLI.
DEFAULT_BATCH_CONCURRENCY = 16
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
