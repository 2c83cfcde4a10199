"""Property-based tests of parse_variant_path, generated with hypothesis.

Any raw path either maps to a safe key under the variant prefix or raises
InvalidPath or NotFound, and the app responds to such paths without a 500.
"""

import asyncio
import unicodedata
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.app import create_app
from proxy.errors import InvalidPath, NotFound
from proxy.paths import MAX_KEY_BYTES, VariantRequest, parse_variant_path
from proxy.settings import OUTPUT_FORMATS, Settings

# Derandomized and without the example database, so every run, local or CI, tries
# the same examples. The fixtures only build Settings, which no example changes,
# so sharing them across examples is safe.
PROPERTIES = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=400,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
# A request through the app costs far more than a parse, so it gets fewer examples.
APP_PROPERTIES = settings(PROPERTIES, max_examples=100)

# Prefix pairs: the defaults, the whole bucket as the source, and variants that
# live inside the source prefix.
PREFIXES = [("original/", "r/"), ("", "r/"), ("original/", "original/r/")]
WIDTHS = [360, 720, 1200, 2200]


@pytest.fixture(params=PREFIXES, ids=["default", "whole-bucket", "nested"])
def path_settings(request, settings_for, tmp_path: Path) -> Settings:
    source_prefix, variant_prefix = request.param
    return settings_for(
        storage=str(tmp_path),
        source_prefix=source_prefix,
        variant_prefix=variant_prefix,
        widths=",".join(map(str, WIDTHS)),
    )


def percent_encode(data: bytes) -> bytes:
    return "".join(f"%{byte:02X}" for byte in data).encode()


# Pieces that sit next to the checks: dot segments in plain and encoded forms,
# encoded and plain slashes and backslashes, control characters, broken escapes,
# non-UTF-8 bytes, prefixes, widths and extensions.
TOKENS = st.sampled_from(
    [
        b"/", b"//", b".", b"..", b"%2e", b"%2E%2e", b"%2e.", b"%2F", b"%2f", b"\\", b"%5C",
        b"%00", b"%0A", b"%0d", b"%7F", b"%C2%85", b"\x00", b"\n", b"\t", b"%", b"%G1",
        b"%C3", b"%C3%A9", b"%FF", b"%ED%A0%80", b"\xff", b"\xc3\xa9", b"r", b"r/",
        b"original", b"original/", b"a", b"-", b"-720", b"-0720", b"-99", b"-360",
        b".jpg", b".jpeg", b".webp", b".gif", b".", b"%2Ejpg", b"?", b"#", b" ",
    ]
)
PIECES = (
    TOKENS
    | st.binary(max_size=8)
    | st.binary(max_size=8).map(percent_encode)
    | st.text(max_size=8).map(lambda text: text.encode("utf-8", "surrogatepass"))
    | st.text(max_size=8).map(lambda text: quote(text, errors="surrogatepass").encode())
)
STRUCTURED_PATHS = st.tuples(
    st.sampled_from([b"/", b"/r/", b"/original/r/", b"", b"r/", b"%2F"]),
    st.lists(PIECES, max_size=12).map(b"".join),
).map(b"".join)
# Paths near the key length limit, written plainly and percent-encoded.
LONG_PATHS = st.builds(
    lambda repeat, encoded, width: b"/r/"
    + (percent_encode(b"a") if encoded else b"a") * repeat
    + f"-{width}.jpg".encode(),
    st.integers(MAX_KEY_BYTES - 20, MAX_KEY_BYTES + 5),
    st.booleans(),
    st.sampled_from(WIDTHS),
)
RAW_PATHS = st.binary(max_size=64) | STRUCTURED_PATHS | LONG_PATHS


def is_control(char: str) -> bool:
    return unicodedata.category(char) == "Cc"


def parse_or_reject(raw_path: bytes, settings: Settings) -> VariantRequest | None:
    """Parse a raw path, returning None for the two rejections it may raise."""
    try:
        return parse_variant_path(raw_path, settings)
    except (InvalidPath, NotFound):
        return None


def assert_safe_request(request: VariantRequest, settings: Settings) -> None:
    segments = request.key.split("/")
    assert all(segment not in ("", ".", "..") for segment in segments), request.key
    assert not any(is_control(char) for char in request.key), request.key
    assert "\\" not in request.key
    assert len(request.key.encode("utf-8")) <= MAX_KEY_BYTES
    assert request.key.startswith(settings.variant_prefix)
    assert request.width in settings.widths
    assert request.ext in OUTPUT_FORMATS
    assert request.source_base.startswith(settings.source_prefix)
    assert not request.source_base.startswith(settings.variant_prefix)


# Arbitrary paths


@PROPERTIES
@given(raw_path=RAW_PATHS)
@example(raw_path=b"/r/%2e%2e/a-720.jpg")
@example(raw_path=b"/r/a%2Fb-720.jpg")
@example(raw_path=b"/r/a%5Cb-720.jpg")
@example(raw_path=b"/r/a%C2%85b-720.jpg")
@example(raw_path=b"/r/%ED%A0%80-720.jpg")
@example(raw_path=b"/r/r/a-720-360.jpg")
def test_any_path_parses_or_rejects(path_settings: Settings, raw_path: bytes):
    request = parse_or_reject(raw_path, path_settings)

    if request is not None:
        assert_safe_request(request, path_settings)


# Round trip of valid keys

SAFE_CHARS = st.characters(exclude_categories=("Cc", "Cs"), exclude_characters="/\\")
SEGMENTS = st.text(SAFE_CHARS, min_size=1, max_size=12).filter(lambda text: text not in (".", ".."))


@PROPERTIES
@given(
    folders=st.lists(SEGMENTS, max_size=4),
    stem=SEGMENTS,
    width=st.sampled_from(WIDTHS),
    ext=st.sampled_from(OUTPUT_FORMATS),
)
@example(folders=[], stem="a-720", width=360, ext="jpg")
@example(folders=["..."], stem="%2e%2e", width=720, ext="png")
def test_quoted_key_round_trips(path_settings: Settings, folders, stem, width, ext):
    key = "/".join([path_settings.variant_prefix.rstrip("/"), *folders, f"{stem}-{width}.{ext}"])
    relative = key[len(path_settings.variant_prefix) :]
    source_base = path_settings.source_prefix + relative.rpartition("-")[0]
    if len(key.encode("utf-8")) > MAX_KEY_BYTES or source_base.startswith(path_settings.variant_prefix):
        return

    request = parse_variant_path(quote(f"/{key}").encode(), path_settings)

    assert request.key == key
    assert request.width == width
    assert request.ext == ext
    assert request.source_base == source_base


# Through the app

EXPECTED_STATUSES = {200, 304, 400, 404, 405, 413, 415, 422}
# The other routes share the catch-all's path, and the preview page decodes its
# key with the same checks.
OTHER_ROUTE_PATHS = st.tuples(
    st.sampled_from([b"/preview/", b"/preview", b"/preview/r/", b"/events/s3", b"/healthz"]),
    st.lists(PIECES, max_size=6).map(b"".join),
).map(b"".join)


def server_ascii(raw_path: bytes) -> bytes:
    """Turn a raw path into one an HTTP server passes on as an origin-form target.

    Such a target starts with '/', and bytes outside printable ASCII, '?' and '#'
    arrive percent-encoded.
    """
    target = b"".join(
        bytes([byte]) if 0x21 <= byte <= 0x7E and byte not in b"?#" else percent_encode(bytes([byte]))
        for byte in raw_path
    )
    return target if target.startswith(b"/") else b"/" + target


async def request_status(app, method: str, raw_path: bytes) -> int:
    """Send one request to the ASGI app with the scope fields uvicorn fills in."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "raw_path": raw_path,
        # uvicorn decodes the target as ASCII and percent-decodes it with "replace".
        "path": unquote(raw_path.decode("ascii")),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }
    messages: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        messages.append(message)

    await app(scope, receive, send)
    return next(message["status"] for message in messages if message["type"] == "http.response.start")


def test_app_status_never_500(settings_for, tmp_path: Path):
    app = create_app(settings_for(storage=str(tmp_path)))
    lifespan = app.router.lifespan_context(app)

    with asyncio.Runner() as runner:
        runner.run(lifespan.__aenter__())
        try:

            @APP_PROPERTIES
            @given(
                raw_path=(RAW_PATHS | OTHER_ROUTE_PATHS).map(server_ascii),
                method=st.sampled_from(["GET", "HEAD", "DELETE"]),
            )
            @example(raw_path=b"/r/%0Aa-720.jpg", method="GET")
            @example(raw_path=b"/r/%FF-720.jpg", method="GET")
            @example(raw_path=b"/preview/original/%2e%2e/a.jpg", method="GET")
            def check(raw_path: bytes, method: str) -> None:
                status = runner.run(request_status(app, method, raw_path))
                assert status in EXPECTED_STATUSES, (method, raw_path, status)

            check()
        finally:
            runner.run(lifespan.__aexit__(None, None, None))

