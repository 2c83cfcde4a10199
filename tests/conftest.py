"""Fixtures shared by the tests: a real S3 server (moto) on 127.0.0.1, photos, apps.

Each test gets its own bucket, so tests can run in any order and in parallel
(pytest-xdist starts one moto server per worker process).
"""

import asyncio
import contextlib
import io
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import boto3
import httpx
import pytest
import pyvips
from moto.server import ThreadedMotoServer
from PIL import Image

from proxy.app import create_app, open_store
from proxy.settings import Settings, load_settings
from proxy.store import Store

REPO = Path(__file__).resolve().parent.parent
# Real photographs from Debian's mate-backgrounds, installed by scripts/test when
# it runs as root. Without it, the tests use the photo in images/.
MATE_NATURE = Path("/usr/share/backgrounds/mate/nature")
EMBEDDED_PHOTO = REPO / "images" / "original" / "nature" / "ladybird.jpg"

FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """URL of a moto S3/SQS server on 127.0.0.1, one per test process."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point the standard AWS settings at moto, as a user would for any S3 server."""
    for name, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return moto_endpoint


@pytest.fixture
def bucket(aws_env: str) -> str:
    name = f"test-{uuid.uuid4().hex[:20]}"
    s3_client(aws_env).create_bucket(Bucket=name)
    return name


def s3_client(endpoint: str):
    """A plain boto3 client, for setting up and checking objects from the test side."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture
def s3(aws_env: str):
    return s3_client(aws_env)


@pytest.fixture(scope="session")
def photo_path() -> Path:
    """A real photograph with EXIF data, at least 2000 pixels wide."""
    for name in ("TwoWings.jpg", "Garden.jpg", "LadyBird.jpg"):
        if (MATE_NATURE / name).exists():
            return MATE_NATURE / name
    return EMBEDDED_PHOTO


@pytest.fixture(scope="session")
def photo(photo_path: Path) -> bytes:
    """The real photograph with an EXIF block that includes GPS coordinates."""
    return add_exif_with_gps(photo_path.read_bytes())


def add_exif_with_gps(jpeg: bytes) -> bytes:
    """Replace the JPEG's EXIF block with one that adds camera and GPS tags.

    The pixels are untouched: the APP1 segment is swapped as bytes, with no re-encode.
    """
    exif = Image.open(io.BytesIO(jpeg)).getexif()
    exif[0x010F] = "TestCamera"  # Make
    gps = exif.get_ifd(0x8825)
    gps[1] = "N"  # GPSLatitudeRef
    gps[2] = (48.0, 51.0, 29.0)  # GPSLatitude
    gps[3] = "E"  # GPSLongitudeRef
    gps[4] = (2.0, 17.0, 40.0)  # GPSLongitude
    payload = exif.tobytes()
    assert payload.startswith(b"Exif\x00\x00"), "expected Pillow to add the APP1 EXIF header"
    segment = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    return jpeg[:2] + segment + _without_exif_segments(jpeg)


def _without_exif_segments(jpeg: bytes) -> bytes:
    """Return the JPEG after its SOI marker, less any APP1 EXIF segment."""
    assert jpeg[:2] == b"\xff\xd8", "not a JPEG"
    position = 2
    kept = []
    # Marker segments run until the start of scan (0xDA); the rest is copied whole.
    while jpeg[position] == 0xFF and jpeg[position + 1] != 0xDA:
        length = int.from_bytes(jpeg[position + 2 : position + 4], "big")
        segment = jpeg[position : position + 2 + length]
        if not (segment[1] == 0xE1 and segment[4:10] == b"Exif\x00\x00"):
            kept.append(segment)
        position += 2 + length
    return b"".join(kept) + jpeg[position:]


def make_image(width: int, height: int, suffix: str = ".jpg", **options) -> bytes:
    """A small generated image: a colour gradient, so encoders see real detail."""
    x = pyvips.Image.xyz(width, height)
    red = x[0] * 255 / max(width - 1, 1)
    green = x[1] * 255 / max(height - 1, 1)
    blue = (red + green) / 2
    image = red.bandjoin([green, blue]).cast("uchar").copy(interpretation="srgb")
    return image.write_to_buffer(suffix, **options)


def decode(body: bytes) -> pyvips.Image:
    return pyvips.Image.new_from_buffer(body, "")


@pytest.fixture
def settings_for(monkeypatch: pytest.MonkeyPatch):
    """Build Settings from PROXY_* variables set for this test only."""

    def build(**variables: str) -> Settings:
        for name in [name for name in os.environ if name.startswith("PROXY_")]:
            monkeypatch.delenv(name)
        for name, value in variables.items():
            monkeypatch.setenv(f"PROXY_{name.upper()}", str(value))
        return load_settings()

    return build


@contextlib.asynccontextmanager
async def running_app(settings: Settings, store: Store | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan and yield an HTTP client bound to it."""
    app = create_app(settings, store)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy.test") as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


@pytest.fixture
async def s3_store(bucket: str, settings_for) -> AsyncIterator[Store]:
    settings = settings_for(storage=f"s3://{bucket}")
    store = await open_store(settings)
    yield store
    await store.close()


def jpeg_bytes_of(image: pyvips.Image) -> bytes:
    return image.write_to_buffer(".jpg", Q=90)


def png_with_alpha(width: int, height: int) -> bytes:
    """A generated RGBA PNG: opaque black square in the middle, transparent around."""
    canvas = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    for x in range(width // 4, 3 * width // 4):
        for y in range(height // 4, 3 * height // 4):
            canvas.putpixel((x, y), (0, 0, 0, 255))
    buffer = io.BytesIO()
    canvas.save(buffer, "PNG")
    return buffer.getvalue()


class CountingStore(Store):
    """Wrap a store and record each call as (operation, key), to count store traffic."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.calls: list[tuple[str, str]] = []

    def count(self, operation: str, key: str | None = None) -> int:
        return sum(1 for op, k in self.calls if op == operation and (key is None or k == key))

    @property
    def description(self) -> str:
        return self.inner.description

    async def get(self, key, max_bytes=None, *, need_etag=True):
        self.calls.append(("get", key))
        return await self.inner.get(key, max_bytes, need_etag=need_etag)

    async def head(self, key):
        self.calls.append(("head", key))
        return await self.inner.head(key)

    async def put(self, key, body, content_type, cache_control):
        self.calls.append(("put", key))
        return await self.inner.put(key, body, content_type, cache_control)

    async def list_keys(self, prefix):
        self.calls.append(("list", prefix))
        return await self.inner.list_keys(prefix)

    async def delete(self, key):
        self.calls.append(("delete", key))
        return await self.inner.delete(key)

    async def check(self):
        return await self.inner.check()

    async def close(self):
        await self.inner.close()


class GatedStore(CountingStore):
    """Hold every write until `release` is set; `writing` is set when the first one waits."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.release = asyncio.Event()
        self.writing = asyncio.Event()

    async def put(self, key, body, content_type, cache_control):
        self.writing.set()
        await self.release.wait()
        return await super().put(key, body, content_type, cache_control)
