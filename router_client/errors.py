"""The client's exceptions: one base class, HTTP status errors keyed on the status code, connection errors,
and the routing and image errors raised before or after a request."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lora_router import images
from lora_router.configuration import ConfigError


class RouterClientError(Exception):
    """Base class of every error the client raises."""


class ClientConfigError(RouterClientError, ConfigError):
    """A client setting that cannot work; the message names the field. A ConfigError like every bad setting."""


class InvalidImageError(RouterClientError, images.InvalidImageError):
    """An image that cannot be sent: the message names the file and the problem (lora_router.images' error, raised
    by the client as one of its own)."""


class UnknownExpertError(RouterClientError, LookupError):
    """An expert name that is not in the deployment (a caller's name, or a router answer)."""


class LowConfidenceError(RouterClientError):
    """The router's answer is below ClientConfig.min_confidence and the fallback policy is 'error'."""

    def __init__(self, message: str, expert: str, confidence: float) -> None:
        super().__init__(message)
        self.expert = expert
        self.confidence = confidence


class APIResponseError(RouterClientError):
    """The server answered 200 with a body the client cannot read."""


class APIConnectionError(RouterClientError):
    """No HTTP answer: refused or reset connection, DNS failure, server gone mid-answer."""


class APITimeoutError(APIConnectionError):
    """The request ran past its connect, read or total timeout."""


class APIStatusError(RouterClientError):
    """The server answered with a non-2xx status: its code, x-request-id header, body (parsed JSON, else text)
    and headers."""

    def __init__(self, message: str, *, status_code: int, request_id: str | None, body: Any,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.request_id = request_id
        self.body = body
        self.headers: Mapping[str, str] = headers if headers is not None else {}


class BadRequestError(APIStatusError):
    """400: the request is malformed or names something the server rejects."""


class AuthenticationError(APIStatusError):
    """401: missing or wrong API key."""


class PermissionDeniedError(APIStatusError):
    """403."""


class NotFoundError(APIStatusError):
    """404: unknown path or model name."""


class RateLimitError(APIStatusError):
    """429: the server asks to slow down (retried, honouring Retry-After)."""


class InternalServerError(APIStatusError):
    """5xx (retried)."""


_STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    429: RateLimitError,
}


def status_error_class(status: int) -> type[APIStatusError]:
    """The APIStatusError subclass for an HTTP status."""
    if status >= 500:
        return InternalServerError
    return _STATUS_ERRORS.get(status, APIStatusError)
