"""The HTTP service: FastAPI routes, the lifespan that opens the store, error mapping."""

import contextlib
import logging
from collections.abc import AsyncIterator
from email.utils import format_datetime
from urllib.parse import quote

from fastapi import FastAPI, Request, Response
from fastapi.responses import PlainTextResponse

from .access_log import AccessLogMiddleware
from .errors import Overloaded, ProxyError, Unauthorized
from .event_endpoint import receive_events
from .paths import parse_variant_path
from .settings import Settings, load_settings
from .store import Store, open_store
from .uploads import UploadHandler
from .variants import Variant, VariantService

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, store: Store | None = None) -> FastAPI:
    """Build the app. Without arguments, settings come from the environment.

    A `store` passed in is used as it is and closed when the app stops.
    """
    settings = settings or load_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.store = store or await open_store(settings)
        app.state.variants = VariantService(app.state.store, settings)
        app.state.uploads = UploadHandler(
            app.state.store, settings, app.state.variants.executor, app.state.variants
        )
        logger.info(
            "resize-proxy started store=%s widths=%s threads=%d",
            app.state.store.description,
            ",".join(map(str, settings.widths)),
            settings.thread_count,
        )
        try:
            yield
        finally:
            app.state.variants.close()
            await app.state.store.close()
            logger.info("resize-proxy stopped")

    app = FastAPI(
        title="resize-proxy",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.add_middleware(AccessLogMiddleware)
    app.add_exception_handler(ProxyError, _error_response)

    app.add_api_route("/healthz", healthz, methods=["GET", "HEAD"])
    app.add_api_route("/readyz", readyz, methods=["GET", "HEAD"])
    app.add_api_route("/events/s3", receive_events, methods=["POST"])
    app.add_api_route("/{path:path}", serve_variant, methods=["GET", "HEAD"])
    return app


async def healthz() -> PlainTextResponse:
    return PlainTextResponse("ok\n", headers={"Cache-Control": "no-store"})


async def readyz(request: Request) -> PlainTextResponse:
    await request.app.state.store.check()
    return PlainTextResponse("ready\n", headers={"Cache-Control": "no-store"})


async def serve_variant(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    variants: VariantService = request.app.state.variants

    raw_path = request.scope.get("raw_path") or quote(request.scope["path"]).encode()
    variant_request = parse_variant_path(raw_path, settings)

    # When If-None-Match matches the stored ETag, the proxy returns 304 without
    # fetching or making the image. The client's conditional headers never go to
    # the store, because the store must return the full object.
    if_none_match = request.headers.get("if-none-match")
    variant = variants.cached(variant_request.key)
    if variant is None and if_none_match:
        info = await variants.store.head(variant_request.key)
        if info is not None and _etag_matches(if_none_match, info.etag):
            request.state.layer = "store"
            return _not_modified(info.etag, settings)

    if variant is None:
        variant = await variants.get(variant_request)
    request.state.layer = variant.layer

    if if_none_match and _etag_matches(if_none_match, variant.etag):
        return _not_modified(variant.etag, settings)
    return _variant_response(variant, settings, head=request.method == "HEAD")


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


def _not_modified(etag: str, settings: Settings) -> Response:
    return Response(status_code=304, headers={"ETag": etag, "Cache-Control": settings.cache_control})


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
    headers = {"Cache-Control": settings.error_cache_control}
    if isinstance(error, Overloaded):
        headers["Retry-After"] = str(error.retry_after)
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer, Basic realm="resize-proxy events"'
        headers["Cache-Control"] = "no-store"
    return PlainTextResponse(error.message + "\n", status_code=error.status, headers=headers)
