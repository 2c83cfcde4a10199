"""The HTTP service: FastAPI routes, the lifespan that opens the store, error mapping."""

import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from email.utils import format_datetime, parsedate_to_datetime
from urllib.parse import quote

import pyvips
from fastapi import FastAPI, Request, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import PlainTextResponse
from starlette.types import Receive, Scope, Send

from .access_log import AccessLogMiddleware, raw_path_of, request_id_of, send_logged
from . import imaging, logs, metrics
from .errors import Overloaded, ProxyError, StoreFailed, StoreTimedOut, Unauthorized
from .event_endpoint import receive_events
from .paths import parse_variant_path
from .preview import serve_preview
from .settings import Settings, load_settings
from .store import Store, open_store
from .uploads import UploadHandler
from .variants import Variant, VariantService

logger = logging.getLogger(__name__)


class ProxyApp(FastAPI):
    """The FastAPI app, serving memory-cache hits before its middleware and routing.

    Most requests that reach the proxy are hot hits. On this 2-core machine, with
    wrk on the same cores, the middleware and routing held the proxy to a third of
    the rate of a bare ASGI app returning the same bytes.
    """

    # The service whose memory cache serves hot hits, set while the lifespan runs.
    hot_variants: VariantService | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        variants = self.hot_variants
        if scope["type"] == "http" and variants is not None:
            try:
                hit = memory_hit(scope, variants)
            except Exception:
                # A bug here must not fail the request: the full path serves it.
                logger.exception("unexpected error looking up the memory cache path=%s", raw_path_of(scope))
                hit = None
            if hit is not None:
                variant, request_id = hit
                body = b"" if scope["method"] == "HEAD" else variant.body
                await send_logged(scope, send, variant.headers, body, "memory", "variant", request_id)
                return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None, store: Store | None = None) -> FastAPI:
    """Build the app. Without arguments, settings come from the environment.

    A `store` passed in is used as it is and closed when the app stops.
    """
    settings = settings or load_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: ProxyApp) -> AsyncIterator[None]:
        app.state.store = store or await open_store(settings)
        app.state.variants = VariantService(app.state.store, settings)
        app.hot_variants = app.state.variants
        # Event documents being handled by POST /events/s3.
        app.state.events_in_progress = 0
        app.state.uploads = UploadHandler(
            app.state.store, settings, app.state.variants.executor, app.state.variants
        )
        logger.info(
            "resize-proxy started store=%s widths=%s threads=%d libvips=%s sources=%s",
            app.state.store.description,
            ",".join(map(str, settings.widths)),
            settings.thread_count,
            ".".join(str(pyvips.version(part)) for part in range(3)),
            ",".join(readable_formats()),
        )
        missing = missing_operations()
        if missing:
            logger.warning("libvips lacks %s; sources or outputs in those formats will fail", ", ".join(missing))
        try:
            yield
        finally:
            app.hot_variants = None
            app.state.variants.close()
            await app.state.store.close()
            logger.info("resize-proxy stopped")
            logs.write_through()

    app = ProxyApp(
        title="resize-proxy",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.add_middleware(AccessLogMiddleware, variant_prefix=settings.variant_prefix)
    app.add_exception_handler(ProxyError, _error_response)
    app.add_exception_handler(StarletteHTTPException, _routing_error_response)

    app.add_api_route("/healthz", healthz, methods=["GET", "HEAD"])
    app.add_api_route("/readyz", readyz, methods=["GET", "HEAD"])
    app.add_api_route("/metrics", metrics.serve_metrics, methods=["GET"])
    app.add_api_route("/events/s3", receive_events, methods=["POST"])
    # With PROXY_VARIANT_PREFIX=preview/ the variants keep the path, and there is no preview page.
    if not settings.variant_prefix.startswith("preview/"):
        app.add_api_route("/preview/{key:path}", serve_preview, methods=["GET", "HEAD"])
    app.add_api_route("/{path:path}", serve_variant, methods=["GET", "HEAD"])
    return app


def serve_app() -> FastAPI:
    """Build the app as `resize-proxy serve` runs it, in each worker process."""
    logs.lean_log_records()
    return create_app()


async def healthz() -> PlainTextResponse:
    return PlainTextResponse("ok\n", headers={"Cache-Control": "no-store"})


# libvips operations that serving needs: a loader per source format, a saver per
# output format. HEIC is not here: pyvips-binary reads HEIC headers but cannot decode them.
REQUIRED_OPERATIONS = (
    "jpegload_buffer", "pngload_buffer", "webpload_buffer", "gifload_buffer",
    "tiffload_buffer", "heifload_buffer", "svgload_buffer",
    "jpegsave_buffer", "pngsave_buffer", "webpsave_buffer", "heifsave_buffer",
)


def readable_formats() -> list[str]:
    """Name the source formats that this libvips can read.

    HEIF is reported as AVIF, because HEVC-compressed HEIF (HEIC) cannot be
    decoded with pyvips-binary.
    """
    return [
        "avif" if source_format == "heif" else source_format
        for loader, source_format in imaging.LOADER_FORMATS.items()
        if pyvips.type_find("VipsOperation", loader) != 0
    ]


def missing_operations() -> list[str]:
    """List the libvips operations in REQUIRED_OPERATIONS that this libvips lacks."""
    return [name for name in REQUIRED_OPERATIONS if pyvips.type_find("VipsOperation", name) == 0]


async def readyz(request: Request) -> PlainTextResponse:
    """Report ready when the store is reachable and libvips has every format."""
    missing = missing_operations()
    if missing:
        return PlainTextResponse(
            f"not ready: libvips lacks {', '.join(missing)}; install pyvips-binary or a full libvips\n",
            status_code=503,
            headers={"Cache-Control": "no-store"},
        )
    await request.app.state.store.check()
    return PlainTextResponse("ready: store reachable, image formats loaded\n", headers={"Cache-Control": "no-store"})


# Conditional requests take the full path, which evaluates them.
CONDITIONAL_HEADERS = (b"if-none-match", b"if-modified-since")


def memory_hit(scope: Scope, variants: VariantService) -> tuple[Variant, str] | None:
    """Return the variant in the memory cache that serves this request, and the
    request's id, if there is one.

    The response made from it is the one `serve_variant` gives. Anything else
    (another method or route, a conditional request, a path that does not parse,
    a miss) returns None and takes the full path.
    """
    method = scope["method"]
    if (method != "GET" and method != "HEAD") or not scope["path"].startswith(variants.url_prefix):
        return None
    # One pass over the headers finds both the conditional ones and the request id.
    client_id = None
    for name, value in scope["headers"]:
        if name in CONDITIONAL_HEADERS:
            return None
        if name == b"x-request-id" and client_id is None:
            client_id = value
    raw_path = scope.get("raw_path") or quote(scope["path"]).encode()
    try:
        parsed = variants.parse(raw_path)
    except ProxyError:
        return None
    # Indexing took a quarter of the time of `get` (1 µs against 4 µs) with cachetools 8.
    try:
        variant = variants.memory[parsed.key]
    except KeyError:
        return None
    return variant, request_id_of(client_id)


async def serve_variant(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    variants: VariantService = request.app.state.variants

    raw_path = request.scope.get("raw_path") or quote(request.scope["path"]).encode()
    variant_request = variants.parse(raw_path)

    # A conditional request that matches the stored variant gets 304 without the
    # image being fetched or made. The client's conditional headers never go to
    # the store, because the store must return the full object.
    conditional = request.headers.get("if-none-match") or request.headers.get("if-modified-since")
    variant = variants.cached(variant_request.key)
    if variant is None and conditional:
        info = await variants.store.head(variant_request.key)
        if info is not None and _not_modified_since(request, info.etag, info.last_modified):
            request.state.layer = "store"
            return _not_modified(info.etag, info.last_modified, settings)

    if variant is None:
        variant = await variants.get(variant_request)
    request.state.layer = variant.layer

    if conditional and _not_modified_since(request, variant.etag, variant.last_modified):
        return _not_modified(variant.etag, variant.last_modified, settings)
    return _variant_response(variant, settings, head=request.method == "HEAD")


def _not_modified_since(request: Request, etag: str, last_modified: datetime) -> bool:
    """Evaluate If-None-Match, or If-Modified-Since without it, as RFC 9110 orders them."""
    if_none_match = request.headers.get("if-none-match")
    if if_none_match:
        return _etag_matches(if_none_match, etag)
    try:
        since = parsedate_to_datetime(request.headers.get("if-modified-since", ""))
    except (TypeError, ValueError):
        # An invalid date is ignored, as RFC 9110 requires.
        return False
    if since.tzinfo is None:
        since = since.replace(tzinfo=timezone.utc)
    return last_modified <= since


def _variant_response(variant: Variant, settings: Settings, *, head: bool) -> Response:
    headers = {
        "Content-Length": str(len(variant.body)),
        "ETag": variant.etag,
        "Last-Modified": format_datetime(variant.last_modified, usegmt=True),
        "Cache-Control": settings.cache_control,
    }
    return Response(
        content=b"" if head else variant.body,
        media_type=variant.content_type,
        headers=headers,
    )


def _not_modified(etag: str, last_modified: datetime, settings: Settings) -> Response:
    headers = {
        "ETag": etag,
        "Last-Modified": format_datetime(last_modified, usegmt=True),
        "Cache-Control": settings.cache_control,
    }
    return Response(status_code=304, headers=headers)


def _etag_matches(if_none_match: str, etag: str) -> bool:
    if if_none_match.strip() == "*":
        return True
    # Weak comparison, as RFC 9110 prescribes for If-None-Match.
    wanted = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return etag.removeprefix("W/") in wanted


async def _error_response(request: Request, error: Exception) -> Response:
    assert isinstance(error, ProxyError)
    settings: Settings = request.app.state.settings
    request.state.error = error.message
    # A server-side failure is temporary, so an edge cache must not keep it for a
    # minute. Responses to POST are never cached either.
    server_side = error.status >= 500 or request.method == "POST"
    cache_control = "no-store" if server_side else settings.error_cache_control
    headers = {"Cache-Control": cache_control}
    if isinstance(error, Overloaded):
        headers["Retry-After"] = str(error.retry_after)
    if isinstance(error, StoreFailed):
        metrics.STORE_ERRORS.labels("failed").inc()
    if isinstance(error, StoreTimedOut):
        metrics.STORE_ERRORS.labels("timeout").inc()
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer, Basic realm="resize-proxy events"'
        headers["Cache-Control"] = "no-store"
    return PlainTextResponse(error.message + "\n", status_code=error.status, headers=headers)


# The order in which a 405 message lists the allowed methods.
METHOD_ORDER = ("GET", "HEAD", "POST")


async def _routing_error_response(request: Request, error: Exception) -> Response:
    """Give router errors (405, and 404 for paths no route matches) the plain-text form."""
    assert isinstance(error, StarletteHTTPException)
    if error.status_code == 404:
        # The catch-all route does not match a path with a newline, so such a
        # path ends here; parsing it gives the precise 400 or 404.
        raw_path = request.scope.get("raw_path") or quote(request.scope["path"]).encode()
        try:
            parse_variant_path(raw_path, request.app.state.settings)
        except ProxyError as proxy_error:
            return await _error_response(request, proxy_error)
    message = error.detail
    if error.status_code == 405:
        # The router's Allow header lists the methods of the path's route, in no fixed order.
        allowed = (error.headers or {}).get("Allow", "GET, HEAD").split(", ")
        ordered = [method for method in METHOD_ORDER if method in allowed]
        ordered += sorted(set(allowed) - set(METHOD_ORDER))
        message = f"method not allowed; use {' or '.join(ordered)}"
    settings: Settings = request.app.state.settings
    request.state.error = message
    # A 405 is the response to a method whose responses caches do not store.
    cache_control = "no-store" if error.status_code == 405 else settings.error_cache_control
    headers = {"Cache-Control": cache_control, **(error.headers or {})}
    return PlainTextResponse(f"{message}\n", status_code=error.status_code, headers=headers)
