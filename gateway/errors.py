"""Typed errors, raised where a problem is found and turned into OpenAI error JSON in one place.

Knows the OpenAI error shape ``{"error": {"message", "type", "param", "code"}}`` and which
HTTP status each failure gets. Does not know where errors come from.
"""

from __future__ import annotations

from typing import Any, ClassVar


class GatewayError(Exception):
    """Base of every error a client sees; subclasses fix the status and the OpenAI ``type``."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers: dict[str, str] = {}
        """Response headers to send with the error (x-request-id and the like)."""

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class PayloadTooLarge(InvalidRequest):
    status = 413
    default_code = "request_too_large"


class UnsupportedMediaType(InvalidRequest):
    status = 415
    default_code = "unsupported_media_type"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDenied(GatewayError):
    """Authenticated, or on an address where nobody may be, but not allowed this endpoint."""

    status = 403
    type = "permission_error"
    default_code = "permission_denied"


class Conflict(InvalidRequest):
    """The request cannot be carried out in the current state (e.g. no canary to promote)."""

    status = 409
    default_code = "conflict"


class ModelNotFound(InvalidRequest):
    status = 404
    default_code = "model_not_found"


class CompletionNotFound(InvalidRequest):
    """An unknown completion id, or one made with another API key (the same answer: no existence leak)."""

    status = 404
    default_code = "completion_not_found"


class RetryLater(GatewayError):
    """An error the client may retry after ``Retry-After`` seconds (sent as a whole number, at least 1)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.headers["retry-after"] = str(max(1, round(retry_after_s + 0.5)))


class RateLimited(RetryLater):
    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class BackendRejected(InvalidRequest):
    """vLLM refused the request as invalid (its 4xx): the client's to fix, passed on as such."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message, code="backend_rejected")
        self.status = status  # type: ignore[misc]  # the backend's own 4xx


class BackendUnavailable(RetryLater):
    status = 503
    type = "service_unavailable"
    default_code = "backend_unavailable"


class BackendFailed(GatewayError):
    status = 502
    type = "server_error"
    default_code = "backend_error"


class BackendTimeout(GatewayError):
    status = 504
    type = "timeout"
    default_code = "backend_timeout"


class DeadlineExceeded(GatewayError):
    """The request's deadline (``deadline_ms``, else ``timeouts.deadline_s``) passed before it had an answer."""

    status = 504
    type = "timeout"
    default_code = "deadline_exceeded"


class ScorerFailed(GatewayError):
    status = 500
    type = "server_error"
    default_code = "reward_model_error"


class ScorerUnavailable(RetryLater):
    """The reward model failed or missed its deadline, and ``scorer.on_failure`` is ``fail_closed``."""

    status = 503
    type = "service_unavailable"
    default_code = "reward_model_unavailable"


class Overloaded(RetryLater):
    """Too many requests in flight: refused at once (cheap for the SDKs' retries), with Retry-After."""

    status = 503
    type = "service_unavailable"
    default_code = "overloaded"


class LogUnavailable(RetryLater):
    """A record whose 200 means it is kept (a thumb) could not be kept: refused, to be sent again."""

    status = 503
    type = "service_unavailable"
    default_code = "log_unavailable"


class StreamTooLong(GatewayError):
    """A relayed stream ran past ``limits.max_stream_s`` (sent as the stream's last event: the status was 200)."""

    status = 408
    type = "timeout"
    default_code = "stream_too_long"


class NotReady(GatewayError):
    status = 503
    type = "service_unavailable"
    default_code = "not_ready"
