"""Every call the gateway makes to vLLM, on one connection pool, with one mapping of vLLM's failures to errors.

    transport   no answer within gateway.upstream_timeout_s -> 504 upstream_timeout
                connection refused (vLLM down or restarting) -> 503 upstream_unavailable, with Retry-After
                any other broken connection (vLLM died mid-answer) -> 502 upstream_failed
    answers     an error answer -> UpstreamError with vLLM's own message: a 4xx keeps its status, coded by it
                (RELAYED_CODES; an unknown model is model_not_found); a 5xx, or a 4xx the gateway caused (its
                internal key refused, say), is 502 upstream_failed. Callers relay it or, for the admin API's
                steps, report it as the step that failed

The caller's requests, the router's, the shadow router's, /tokenize, /health, /metrics and adapter loading all
go through here: vLLM listens on loopback with an internal key that only this object sends.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from lora_router.openai_wire import bearer_headers, error_message, error_param
from serving.gateway.protocol import GatewayError, retry_after

# vLLM's header that pins a request to one data-parallel engine.
RANK_HEADER = "X-data-parallel-rank"
# vLLM's header that names a request (its request id, in its log and its response).
REQUEST_ID_HEADER = "X-Request-Id"
# vLLM's 4xx answers the caller's request caused, relayed with their status under these codes.
RELAYED_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large",
                 422: "invalid_request"}
# Seconds a health or metrics probe may take: a caller polls these and must not hang on a stuck vLLM.
_PROBE_TIMEOUT_S = 5


class UpstreamError(GatewayError):
    """vLLM answered with an error: as the gateway answers it (see the module), with vLLM's own status kept in
    `upstream_status` and its message in `upstream_message`."""

    def __init__(self, upstream_status: int, message: str, param: str | None, path: str) -> None:
        if upstream_status in RELAYED_CODES:
            code = "model_not_found" if upstream_status == 404 and param == "model" else RELAYED_CODES[upstream_status]
            super().__init__(upstream_status, message, type="invalid_request_error", param=param, code=code)
        else:
            super().__init__(502, f"vLLM answered {upstream_status}: {message}", type="server_error",
                             code="upstream_failed")
        self.upstream_status = upstream_status
        self.upstream_message = message
        self.path = path


class Upstream:
    """The session to one vLLM server: `root` its URL (no /v1), `key` its internal API key."""

    def __init__(self, root: str, key: str, timeout_s: float) -> None:
        self.root = root
        self.key = key
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        """Open the connection pool (idempotent)."""
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=self.timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout, headers=bearer_headers(self.key),
                                                  connector=aiohttp.TCPConnector(limit=0))

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        """The open session (the probes of serving.probe take it as it is); 503 before open()."""
        if self._session is None:
            raise GatewayError(503, "the gateway is not started", type="server_error", code="upstream_unavailable",
                               headers=retry_after())
        return self._session

    @contextlib.asynccontextmanager
    async def call(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                   headers: dict[str, str] | None = None, rank: int | None = None,
                   request_id: str | None = None) -> AsyncIterator[aiohttp.ClientResponse]:
        """One request to vLLM, its response open for streaming; transport failures mapped as the module says.
        `request_id` names it in vLLM (its log, its answer's x-request-id)."""
        headers = dict(headers or {})
        if rank is not None:
            headers[RANK_HEADER] = str(rank)
        if request_id is not None:
            headers[REQUEST_ID_HEADER] = request_id
        try:
            async with self.session.request(method, self.root + path, json=body if raw is None else None, data=raw,
                                            headers=headers) as response:
                yield response
        except TimeoutError:
            raise GatewayError(504, f"vLLM did not answer {path} within {self.timeout_s:g} s", type="server_error",
                               code="upstream_timeout") from None
        except aiohttp.ClientConnectorError:
            raise GatewayError(503, "vLLM is down (connection refused); retry shortly", type="server_error",
                               code="upstream_unavailable", headers=retry_after()) from None
        except aiohttp.ClientError as exc:
            raise GatewayError(502, f"vLLM broke off the answer ({type(exc).__name__}: {exc})", type="server_error",
                               code="upstream_failed") from None

    async def read(self, method: str, path: str, body: Any = None, rank: int | None = None,
                   request_id: str | None = None) -> bytes:
        """A whole 200 answer's body; UpstreamError for any other status."""
        async with self.call(method, path, body, rank=rank, request_id=request_id) as response:
            data = await response.read()
        if response.status != 200:
            raise upstream_error(response.status, data, path)
        return data

    async def json(self, method: str, path: str, body: Any = None, rank: int | None = None,
                   request_id: str | None = None) -> dict[str, Any]:
        """A 200 answer's JSON object; 502 if it is none."""
        data = await self.read(method, path, body, rank, request_id)
        try:
            answer = json.loads(data)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise GatewayError(502, f"vLLM answered {path} with no JSON object", type="server_error",
                               code="upstream_failed")
        return answer

    async def healthy(self) -> bool:
        """Whether vLLM answers its /health with 200 right now."""
        try:
            async with self.session.get(self.root + "/health",
                                        timeout=aiohttp.ClientTimeout(total=_PROBE_TIMEOUT_S)) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def metrics(self) -> bytes:
        """vLLM's own Prometheus text, or nothing when it does not answer."""
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, GatewayError):
            async with self.session.get(self.root + "/metrics",
                                        timeout=aiohttp.ClientTimeout(total=_PROBE_TIMEOUT_S)) as r:
                if r.status == 200:
                    return await r.read()
        return b""


def upstream_error(status: int, data: bytes, path: str) -> UpstreamError:
    """vLLM's own error answer to `path` (status and body) as the gateway answers it."""
    text = data.decode("utf-8", "replace")
    return UpstreamError(status, error_message(text), error_param(text), path)
