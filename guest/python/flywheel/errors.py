"""Errors from inference calls, and the HTTP answer each maps to."""


class FlywheelError(Exception):
    """Base of every error this SDK raises."""


class InferenceError(FlywheelError):
    """A `wasi:nn` call failed. `code` is the wasi-nn error code, e.g. "too-large"."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


class ModelError(FlywheelError):
    """A `flywheel:llm/model` call failed. `code` is e.g. "not-found" or "invalid-argument"."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


class QuotaError(FlywheelError):
    """The request's API key spent a quota (its token quota, even mid-generation): answer 429.
    `retry_after_ms` is None when the request can never fit the quota."""

    def __init__(self, message, retry_after_ms):
        super().__init__(message)
        self.message = message
        self.retry_after_ms = retry_after_ms


class ProtocolError(FlywheelError):
    """The host returned something this SDK did not expect."""


class HttpError(FlywheelError):
    """An HTTP error answer: status, a machine-readable type, a message, the field at fault."""

    def __init__(self, status, kind, message, param=None, retry_after=None):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.param = param
        # Seconds for the Retry-After header of 429 and 503 answers (1 when None).
        self.retry_after = retry_after

    @classmethod
    def bad_request(cls, message, param=None):
        return cls(400, "invalid_request_error", message, param)

    @classmethod
    def not_found(cls, message):
        return cls(404, "not_found_error", message)

    def to_json(self):
        """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}

    def __str__(self):
        return f"{self.status} {self.kind}: {self.message}"


_INFERENCE_STATUS = {
    "invalid-argument": (400, "invalid_request_error"),
    "invalid-encoding": (400, "invalid_request_error"),
    "too-large": (400, "context_length_exceeded"),
    "not-found": (404, "model_not_found"),
    "security": (403, "permission_error"),
    "timeout": (503, "overloaded_error"),
    "unsupported-operation": (501, "unsupported_error"),
}

_MODEL_STATUS = {
    "not-found": (404, "model_not_found"),
    "not-allowed": (403, "permission_error"),
    "invalid-argument": (400, "invalid_request_error"),
    "unsupported": (400, "unsupported_error"),
}


def to_http_error(e):
    """The HTTP answer for any exception a handler let escape."""
    if isinstance(e, HttpError):
        return e
    if isinstance(e, QuotaError):
        # Rounded up; a request that can never fit is told to wait a whole minute.
        after = 60 if e.retry_after_ms is None else max(1, -(-e.retry_after_ms // 1000))
        return HttpError(429, "rate_limit_error", e.message, retry_after=after)
    if isinstance(e, InferenceError):
        status, kind = _INFERENCE_STATUS.get(e.code, (500, "server_error"))
        return HttpError(status, kind, e.message)
    if isinstance(e, ModelError):
        status, kind = _MODEL_STATUS.get(e.code, (500, "server_error"))
        return HttpError(status, kind, e.message)
    return HttpError(500, "server_error", f"{type(e).__name__}: {e}")
