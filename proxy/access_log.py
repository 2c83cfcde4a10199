"""One log line per HTTP request, with its id, status, duration, cache layer and error."""

import asyncio
import itertools
import json
import logging
import os
import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import logs, metrics

logger = logging.getLogger(__name__)

# An incoming request id is kept, so a line can be matched with the edge cache's
# log, if it is short and printable.
MAX_REQUEST_ID_LENGTH = 64
# Letters, digits and `._:-` only, so an id cannot add fields to a log line.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]+")

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
    state; the level is INFO below 500 and WARNING from 500 up. `variant_prefix`
    names the variant route in the request counter.
    """

    def __init__(self, app: ASGIApp, variant_prefix: str) -> None:
        self.app = app
        self.variant_prefix = variant_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        request_id = _request_id(scope)
        state = scope.setdefault("state", {})
        started = time.perf_counter()
        status = 500
        body_bytes = 0

        response_started = False

        async def send_tracked(message: Message) -> None:
            nonlocal status, response_started, body_bytes
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
            await send(message)
            # The server sends no body in a response to HEAD.
            if message["type"] == "http.response.body" and scope["method"] != "HEAD":
                body_bytes += len(message.get("body", b""))

        try:
            await self.app(scope, receive, send_tracked)
        except asyncio.CancelledError:
            # The client went away before the response ended; nginx logs this as 499.
            status = 499
            raise
        except Exception as error:
            # Error types that map to a status are handled inside the app, so
            # this is a bug. It is logged here once, and the client gets a short
            # 500 instead of a traceback.
            logger.exception("unexpected error id=%s path=%s", request_id, raw_path_of(scope))
            state["error"] = f"unexpected {type(error).__name__}"
            if not response_started:
                await send_tracked(INTERNAL_ERROR_START)
                await send_tracked(INTERNAL_ERROR_BODY)
        finally:
            route = metrics.route_of(scope["path"], self.variant_prefix)
            log_request(scope, request_id, status, started, state.get("layer"), state.get("error"), route, body_bytes)


async def send_logged(
    scope: Scope, send: Send, headers: tuple, body: bytes, layer: str, route: str, request_id: str | None = None
) -> None:
    """Send a whole 200 response made without the app, then log and count it as the middleware would.

    Memory-cache hits take this path, which skips the middleware and routing.
    `request_id` is the request's id when the caller has already found it.
    """
    started = time.perf_counter()
    if request_id is None:
        request_id = _request_id(scope)
    status = 500
    error = None
    sent = 0
    try:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [*headers, (b"x-request-id", request_id.encode())],
            }
        )
        status = 200
        await send({"type": "http.response.body", "body": body})
        sent = len(body)
    except asyncio.CancelledError:
        status = 499
        raise
    except Exception as failure:
        # Only the server can fail here, for example by rejecting a header, so a
        # second response start would fail too. The error is logged once, as in
        # the middleware.
        logger.exception("unexpected error id=%s path=%s", request_id, raw_path_of(scope))
        error = f"unexpected {type(failure).__name__}"
    finally:
        log_request(scope, request_id, status, started, layer, error, route, sent)


def log_request(
    scope: Scope,
    request_id: str,
    status: int,
    started: float,
    layer: str | None,
    error: str | None,
    route: str,
    body_bytes: int,
) -> None:
    """Write the request's line, and count it by route, status and layer, with its body bytes."""
    duration_ms = (time.perf_counter() - started) * 1000
    metrics.RESPONSES.count(route, status, layer, body_bytes)
    error_field = json.dumps(error) if error else "-"
    args = (request_id, scope["method"], raw_path_of(scope), status, duration_ms, layer or "-", error_field)
    if status >= 500:
        logger.warning(ACCESS_LINE, *args)
    elif not logs.queue_info(logger, ACCESS_LINE, args):
        logger.info(ACCESS_LINE, *args)


# The error is a JSON string, so that a path quoted in it cannot add fields:
# `error="source original/a status=200.* not found"`.
ACCESS_LINE = "request id=%s method=%s path=%s status=%d duration_ms=%.1f layer=%s error=%s"


# A random part per process and a counter: unique across replicas, and much
# cheaper than a UUID on every request.
_id_prefix = os.urandom(12).hex()
_id_counter = itertools.count()


def _new_id_prefix() -> None:
    global _id_prefix
    _id_prefix = os.urandom(12).hex()


os.register_at_fork(after_in_child=_new_id_prefix)


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            return request_id_of(value)
    return request_id_of(None)


def request_id_of(client_id: bytes | None) -> str:
    """Return the request id: the client's `client_id` (its X-Request-ID) if it is short and
    printable, or else a new one."""
    if client_id is not None and 0 < len(client_id) <= MAX_REQUEST_ID_LENGTH:
        text = client_id.decode("latin-1")
        if REQUEST_ID.fullmatch(text):
            return text
    return f"{_id_prefix}{next(_id_counter) & 0xFFFFFFFF:08x}"


# Longer paths are cut in log lines, so that a line stays within one atomic pipe
# write (4096 bytes) and `serve --workers N` cannot interleave it with another.
# JSON escaping can double the length of a path made of `"` characters.
MAX_LOGGED_PATH = 1000


def raw_path_of(scope: Scope) -> str:
    # The raw path is still percent-encoded, so a control character in a hostile
    # URL cannot forge a line in the log.
    raw_path = scope.get("raw_path")
    path = repr(scope["path"]) if raw_path is None else raw_path.decode("latin-1")
    if len(path) > MAX_LOGGED_PATH:
        return path[:MAX_LOGGED_PATH] + "..."
    return path
