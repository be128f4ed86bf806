"""The client's HTTP side: one aiohttp session, JSON POSTs with timeouts, retries with jittered backoff (or the
server's Retry-After), and non-2xx answers mapped by status onto router_client.errors. RouterClient and served
validation send every request through it; it knows nothing of routing.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import random
import time
from collections.abc import Mapping
from typing import Any

import aiohttp

from lora_router.openai_wire import ChatCompletion, ResponseFormatError, bearer_headers, error_message, read_completion
from router_client import _constants as C
from router_client.config import ClientConfig
from router_client.errors import (
    APIConnectionError,
    APIResponseError,
    APIStatusError,
    APITimeoutError,
    InternalServerError,
    RateLimitError,
    RouterClientError,
    status_error_class,
)
from router_client.types import APIResponse, ClientStats

Timeout = float | aiohttp.ClientTimeout
_RETRIED = (APIConnectionError, RateLimitError, InternalServerError)


class BaseClient:
    """HTTP transport to one vLLM server for a ClientConfig (address, API key, timeouts, retries, connections).

    Counts every attempt and retry in `stats`. The session opens on first use; close() ends it (a later request
    opens a new one).
    """

    def __init__(self, config: ClientConfig, stats: ClientStats) -> None:
        self.config = config
        self.stats = stats
        self._session: aiohttp.ClientSession | None = None

    def open(self) -> None:
        """Open the session now rather than on the first request."""
        self._ensure_session()

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def chat_completion(self, body: dict[str, Any], timeout: Timeout | None = None,
                              max_retries: int | None = None) -> ChatCompletion:
        """POST {base_url}/chat/completions and read the answer's first choice."""
        answer = await self.post(self.config.base_url + "/chat/completions", body, timeout, max_retries)
        try:
            return read_completion(answer)
        except ResponseFormatError as exc:
            raise APIResponseError(str(exc)) from None

    async def post(self, url: str, body: dict[str, Any], timeout: Timeout | None = None,
                   max_retries: int | None = None) -> dict[str, Any]:
        """POST JSON and return the JSON answer, retrying connection errors, timeouts, 429 and 5xx."""
        return (await self.post_response(url, body, timeout, max_retries)).body

    async def post_response(self, url: str, body: dict[str, Any], timeout: Timeout | None = None,
                            max_retries: int | None = None) -> APIResponse:
        """As post(), with the answer's status and headers kept."""
        retries = self.config.max_retries if max_retries is None else max_retries
        client_timeout = self._client_timeout(timeout)
        attempt = 0
        while True:
            try:
                return await self._post_once(url, body, client_timeout)
            except _RETRIED as exc:
                if attempt >= retries:
                    raise
                delay = _retry_delay(attempt, exc)
            attempt += 1
            self.stats.retries += 1
            await asyncio.sleep(delay)

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.config.max_connections),
                                                  headers=bearer_headers(self.config.api_key))
        return self._session

    def _client_timeout(self, timeout: Timeout | None) -> aiohttp.ClientTimeout:
        if isinstance(timeout, aiohttp.ClientTimeout):
            return timeout
        total = self.config.timeout_s if timeout is None else timeout
        return aiohttp.ClientTimeout(total=total, connect=min(self.config.connect_timeout_s, total),
                                     sock_read=min(self.config.read_timeout_s, total))

    async def _post_once(self, url: str, body: dict[str, Any], timeout: aiohttp.ClientTimeout) -> APIResponse:
        session = self._ensure_session()
        self.stats.requests += 1
        try:
            async with session.post(url, json=body, timeout=timeout) as response:
                data = await response.read()
                status, headers = response.status, response.headers.copy()
        except TimeoutError as exc:  # aiohttp's read and connect timeouts are TimeoutError subclasses too
            raise APITimeoutError(f"POST {url}: no answer within the timeout ({timeout.total} s total, "
                                  f"{timeout.sock_read} s read)") from exc
        except aiohttp.ClientError as exc:
            raise APIConnectionError(f"POST {url}: {type(exc).__name__}: {exc}") from exc
        text = data.decode("utf-8", errors="replace")
        try:
            answer: Any = json.loads(text)
        except ValueError:
            answer = None
        if not 200 <= status < 300:
            error_class = status_error_class(status)
            raise error_class(f"{status} from POST {url}: {error_message(text)}", status_code=status,
                              request_id=headers.get("x-request-id"),
                              body=text if answer is None else answer, headers=headers)
        if not isinstance(answer, dict):
            raise APIResponseError(f"POST {url} answered {status} with a body that is no JSON object: {text[:200]!r}")
        return APIResponse(status_code=status, headers=headers, body=answer)


def _retry_delay(attempt: int, exc: RouterClientError) -> float:
    """Seconds before retry number attempt + 1: the server's Retry-After (capped), else jittered backoff."""
    retry_after = _retry_after_s(exc.headers) if isinstance(exc, APIStatusError) else None
    if retry_after is not None:
        return retry_after
    delay = min(C.INITIAL_RETRY_DELAY_S * 2 ** attempt, C.MAX_RETRY_DELAY_S)
    return delay * (1 - 0.25 * random.random())


def _retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Retry-After as seconds (a number or an HTTP date), capped at MAX_RETRY_AFTER_S; None if absent/bad."""
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), C.MAX_RETRY_AFTER_S)
