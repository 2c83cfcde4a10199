"""Errors that end a request, each with its HTTP status and a message safe for clients.

The app maps them to responses in one place (`proxy.app`). Code below the HTTP layer
raises these instead of building responses, so the store, the pipeline and the
request path stay independent of FastAPI.
"""


class ProxyError(Exception):
    """A failure that the client sees as `status` with `message` as the body."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(ProxyError):
    status = 400


class InvalidPath(InvalidRequest):
    pass


class Unauthorized(ProxyError):
    status = 401


class NotFound(ProxyError):
    status = 404


class SourceTooLarge(ProxyError):
    status = 413


class PayloadTooLarge(ProxyError):
    """A request body over its limit; also 413, but about the request, not the source."""

    status = 413


class UnsupportedFormat(ProxyError):
    status = 415


class UndecodableSource(ProxyError):
    status = 422


class StoreFailed(ProxyError):
    status = 502


class Overloaded(ProxyError):
    status = 503

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StoreTimedOut(ProxyError):
    status = 504


class ProcessingTimedOut(ProxyError):
    """Making a variant took longer than PROXY_PROCESSING_TIMEOUT and was stopped."""

    status = 504
