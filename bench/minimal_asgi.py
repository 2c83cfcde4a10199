"""The hot-hit reference: an ASGI app that returns one file's bytes from memory.

It sends the headers that the proxy sends for a variant, so the two differ only in
the work done per request. The harness runs it with uvicorn as the proxy is run:

    BENCH_BODY=/path/photo-720.jpg uvicorn --app-dir bench minimal_asgi:app \
        --no-access-log --no-server-header --no-proxy-headers
"""

import os
from pathlib import Path

BODY = Path(os.environ["BENCH_BODY"]).read_bytes()
HEADERS = [
    (b"content-type", b"image/jpeg"),
    (b"content-length", str(len(BODY)).encode()),
    (b"etag", b'"0123456789abcdef0123456789abcdef"'),
    (b"last-modified", b"Fri, 04 Dec 2026 12:00:00 GMT"),
    (b"cache-control", b"public, max-age=31536000, immutable"),
]


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
