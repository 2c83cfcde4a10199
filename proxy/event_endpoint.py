"""`POST /events/s3`: S3, SNS and EventBridge event documents over HTTP.

The response comes after the work is done, so a sender that retries on errors
(SNS, EventBridge API destinations) covers failed records.
"""

import base64
import binascii
import hmac
import logging
from collections import Counter

from fastapi import Request
from fastapi.responses import JSONResponse

from .errors import InvalidRequest, NotFound, Overloaded, PayloadTooLarge, Unauthorized
from .events import InvalidEvent, parse_document
from .settings import Settings
from .uploads import FAILED, UploadHandler

logger = logging.getLogger(__name__)


async def receive_events(request: Request) -> JSONResponse:
    settings: Settings = request.app.state.settings
    handler: UploadHandler = request.app.state.uploads

    if settings.event_token is None:
        raise NotFound("the event endpoint is off; set PROXY_EVENT_TOKEN to turn it on")
    # Authentication comes before the body is read, so a caller without the
    # token cannot make the proxy buffer or parse anything.
    _check_token(request.headers.get("authorization"), settings.event_token.get_secret_value())
    body = await _read_body(request, settings.event_max_bytes)

    try:
        events = parse_document(body)
    except InvalidEvent as error:
        raise InvalidRequest(f"invalid event document: {error}") from None
    if len(events) > settings.event_max_records:
        raise PayloadTooLarge(
            f"document has {len(events)} records, over the limit of "
            f"{settings.event_max_records} (PROXY_EVENT_MAX_RECORDS); send fewer per request"
        )

    # Each document may make dozens of variants, so the documents handled at
    # once are bounded; a sender that gets 503 retries later.
    state = request.app.state
    if state.events_in_progress >= settings.event_concurrency:
        raise Overloaded(
            f"{settings.event_concurrency} event documents are being handled, the limit of "
            "PROXY_EVENT_CONCURRENCY; send this one again later"
        )
    state.events_in_progress += 1
    try:
        outcomes = [await handler.handle(event) for event in events]
    finally:
        state.events_in_progress -= 1

    counts = Counter(outcome.result for outcome in outcomes)
    summary = {
        "records": len(outcomes),
        **{result: counts[result] for result in ("made", "deleted", "skipped", "failed")},
        "failures": [{"key": o.key, "reason": o.reason} for o in outcomes if o.result == FAILED],
    }
    request.state.layer = "event"
    # 502 makes the sender retry the document; records already done are
    # idempotent, so repeating them is harmless.
    status = 502 if counts[FAILED] else 200
    if counts[FAILED]:
        request.state.error = f"{counts[FAILED]} of {len(outcomes)} records failed"
    return JSONResponse(summary, status_code=status, headers={"Cache-Control": "no-store"})


def _check_token(authorization: str | None, token: str) -> None:
    """Accept `Bearer <token>`, or HTTP Basic with the token as the password.

    SNS HTTPS subscriptions can only carry credentials as user:password in the
    endpoint URL, which arrive as Basic. Comparisons take constant time.
    """
    offered = ""
    if authorization:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer":
            offered = credentials.strip()
        elif scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                decoded = ""
            offered = decoded.partition(":")[2]
    if not hmac.compare_digest(offered.encode("utf-8"), token.encode("utf-8")) or not offered:
        raise Unauthorized(
            "missing or wrong token; send 'Authorization: Bearer <PROXY_EVENT_TOKEN>' "
            "or HTTP Basic with the token as the password"
        )


async def _read_body(request: Request, max_bytes: int) -> bytes:
    too_large = PayloadTooLarge(
        f"event document is over the limit of {max_bytes} bytes (PROXY_EVENT_MAX_BYTES)"
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)
