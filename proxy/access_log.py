"""One log line per HTTP request, with its id, status, duration, cache layer and error."""

import asyncio
import logging
import re
import time
import uuid

from collections.abc import Awaitable, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import metrics

logger = logging.getLogger(__name__)

# An incoming request id is kept, so a line can be matched with the edge cache's
# log, if it is short and printable.
MAX_REQUEST_ID_LENGTH = 64
# Letters, digits and `._:-` only, so an id cannot add fields to a log line.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]+")

# Sends the whole response to the request in `scope` and returns True, or sends
# nothing and returns False.
FastPath = Callable[[Scope, Send], Awaitable[bool]]

INTERNAL_ERROR_TEXT = b"internal error; the proxy logged the details\n"
INTERNAL_ERROR_START: Message = {
    "type": "http.response.start",
    "status": 500,
    "headers": [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(INTERNAL_ERROR_TEXT)).encode()),
        (b"cache-control", b"no-store"),
    ],
}
INTERNAL_ERROR_BODY: Message = {"type": "http.response.body", "body": INTERNAL_ERROR_TEXT}


class AccessLogMiddleware:
    """Log each request once it ends, and return its id in `X-Request-ID`.

    An exception that escapes the app becomes a 500 with a short body.

    Handlers add `layer` (memory, store or generated) and `error` to the request
    state; the level is INFO below 500 and WARNING from 500 up.

    `fast_path`, when given, may answer a request before the app routes it, and
    returns whether it did.
    """

    def __init__(self, app: ASGIApp, fast_path: FastPath | None = None) -> None:
        self.app = app
        self.fast_path = fast_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        request_id = _request_id(scope)
        state = scope.setdefault("state", {})
        started = time.perf_counter()
        status = 500

        response_started = False

        async def send_tracked(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                # Marked before sending: if the server rejects the message (an
                # invalid header value, say), a second start would fail too.
                response_started = True
                await send(message)
                # Recorded only once the server accepted the start, so the log
                # never shows a status that the client did not get.
                status = message["status"]
                return
            if message["type"] == "http.response.body":
                metrics.BYTES_OUT.inc(len(message.get("body", b"")))
            await send(message)

        try:
            if self.fast_path is None or not await self.fast_path(scope, send_tracked):
                await self.app(scope, receive, send_tracked)
        except asyncio.CancelledError:
            # The client went away before the response ended; nginx logs this as 499.
            status = 499
            raise
        except Exception as error:
            # Error types that map to a status are handled inside the app, so
            # this is a bug. It is logged here once, and the client gets a short
            # 500 instead of a traceback.
            logger.exception("unexpected error id=%s path=%s", request_id, _raw_path(scope))
            state["error"] = f"unexpected {type(error).__name__}"
            if not response_started:
                await send_tracked(INTERNAL_ERROR_START)
                await send_tracked(INTERNAL_ERROR_BODY)
        finally:
            duration_ms = (time.perf_counter() - started) * 1000
            _count(scope, status, state.get("layer"))
            logger.log(
                logging.WARNING if status >= 500 else logging.INFO,
                "request id=%s method=%s path=%s status=%d duration_ms=%.1f layer=%s error=%s",
                request_id,
                scope["method"],
                _raw_path(scope),
                status,
                duration_ms,
                state.get("layer", "-"),
                state.get("error", "-"),
            )


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if 0 < len(text) <= MAX_REQUEST_ID_LENGTH and REQUEST_ID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


def _raw_path(scope: Scope) -> str:
    # The raw path is still percent-encoded, so a control character in a hostile
    # URL cannot forge a line in the log.
    raw_path = scope.get("raw_path")
    if raw_path is None:
        return repr(scope["path"])
    return raw_path.decode("latin-1")


def _count(scope: Scope, status: int, layer: str | None) -> None:
    app_state = getattr(scope.get("app"), "state", None)
    settings = getattr(app_state, "settings", None)
    variant_prefix = settings.variant_prefix if settings is not None else "r/"
    metrics.REQUESTS.labels(metrics.route_of(scope["path"], variant_prefix), str(status)).inc()
    if layer in ("memory", "store", "generated"):
        metrics.VARIANTS_SERVED.labels(layer).inc()
