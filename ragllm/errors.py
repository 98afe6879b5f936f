"""One error tree for the whole service.

Each class knows its HTTP status and its OpenAI error ``type``/``code``; the service raises them and
``ragllm.api.handlers`` is the only place that turns them into the OpenAI error envelope.
"""

from __future__ import annotations


class RagLLMError(Exception):
    """Base of every error the service reports to a client."""

    status_code: int = 500
    error_type: str = "server_error"
    code: str | None = None
    retry_after_s: int | None = None
    headers: dict[str, str] | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_envelope(self) -> dict:
        """The OpenAI error envelope for this error."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(RagLLMError):
    """The request is well-formed HTTP but its content is not acceptable (400)."""

    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    """Prompt plus requested completion does not fit the model's context window (400)."""

    code = "context_length_exceeded"


class Unsupported(InvalidRequest):
    """A valid OpenAI field whose value this server does not support (400)."""

    code = "unsupported_value"


class ConstraintUnfollowable(InvalidRequest):
    """The answer reached a point where its structured-output constraint allows nothing this model
    can write; the constraint is at fault, not the service (400)."""

    code = "structured_output_failed"


class RequestTooLarge(InvalidRequest):
    """The request carries more than a bound allows (bytes of text, documents) (413)."""

    status_code = 413
    code = "request_too_large"


class NotSupportedByEngine(RagLLMError):
    """A valid request the serving engine cannot answer (an upstream without a tokenizer route, say);
    the same request may succeed on another engine (501)."""

    status_code = 501
    error_type = "invalid_request_error"
    code = "not_supported_by_engine"


class ModelNotFound(RagLLMError):
    """The requested model is not served here (404)."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class AuthenticationFailed(RagLLMError):
    """No API key, or a wrong one, where keys are required (401)."""

    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(RagLLMError):
    """A valid key that may not do this: an admin route called with a tenant's key, or admin routes
    with no admin key configured (403)."""

    status_code = 403
    error_type = "permission_error"
    code = "permission_denied"


class RateLimited(RagLLMError):
    """A per-key window is spent (429); ``error_type`` says which: requests or tokens."""

    status_code = 429
    error_type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, error_type: str, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.headers = headers  # x-ratelimit-* and retry-after


class EngineOverloaded(RagLLMError):
    """The engine's waiting queue is full; the client should retry later (503)."""

    status_code = 503
    error_type = "server_overloaded"
    code = "engine_overloaded"
    retry_after_s = 1


class EngineNotReady(RagLLMError):
    """The model is still loading, or the engine failed to start (503)."""

    status_code = 503
    error_type = "server_error"
    code = "engine_not_ready"
    retry_after_s = 5


class ShuttingDown(RagLLMError):
    """The server is draining before it exits; another replica (or a retry) will answer (503)."""

    status_code = 503
    error_type = "server_error"
    code = "server_shutting_down"
    retry_after_s = 1


class CacheUnavailable(RagLLMError):
    """The response cache's store cannot be reached for an operation that must not fail silently
    (an invalidation); retrying later is safe (503)."""

    status_code = 503
    error_type = "server_error"
    code = "cache_unavailable"
    retry_after_s = 1


class EngineFailure(RagLLMError):
    """The engine broke while serving a request (500)."""

    status_code = 500
    error_type = "server_error"
    code = "engine_error"


class EngineInterrupted(EngineFailure):
    """An answer broke off part-way (an upstream died); a client that has seen nothing yet may be
    served by running the request again."""

    code = "engine_interrupted"


class ClientClosedRequest(RagLLMError):
    """The client disconnected before a non-streaming answer was ready (499, as nginx logs it)."""

    status_code = 499
    error_type = "client_closed_request"
    code = "client_closed_request"


class ClientTooSlow(RagLLMError):
    """A streaming client read too slowly: a write stayed blocked past ``server.write_timeout_s``, or the
    answer outgrew ``server.stream_buffer_bytes``. Its connection is dropped, so it never sees this error;
    the request is recorded with this status (408: the server timed out waiting on the client)."""

    status_code = 408
    error_type = "client_too_slow"
    code = "client_too_slow"


class ModelLoadError(RuntimeError):
    """A model could not be resolved or loaded; raised at start-up, not per request."""
