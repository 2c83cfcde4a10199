"""The preview page over ASGI, with moto's S3 server and real libvips."""

import asyncio
import html
import re

import pytest
import pyvips
from conftest import CountingStore, decode, make_image, running_app

from proxy.store import open_store

SOURCE_KEY = "original/trips/p.jpg"
PAGE_URL = "/preview/original/trips/p.jpg"

# One variant's caption: its URL, pixel size, bytes and encode time.
CAPTION = re.compile(
    r'<figcaption><a href="(?P<url>[^"]+)">[^<]+</a>: (?P<width>\d+) × (?P<height>\d+) pixels, '
    r"(?P<bytes>[\d,]+) bytes, (?P<milliseconds>\d+\.\d) ms</figcaption>"
)
IMG_SRC = re.compile(r'<img src="([^"]+)"')
TEXTAREA = re.compile(r'<textarea id="markup"[^>]*>(.*?)</textarea>', re.DOTALL)


@pytest.fixture
def s3_settings(bucket, settings_for):
    return settings_for(storage=f"s3://{bucket}")


def aspect_height(source: bytes, width: int) -> int:
    image = decode(source)
    return max(1, round(image.height * width / image.width))


def captions(page: str) -> dict[str, re.Match[str]]:
    return {match["url"]: match for match in CAPTION.finditer(page)}


async def test_preview_lists_every_variant(s3, bucket, photo, s3_settings):
    s3.put_object(Bucket=bucket, Key=SOURCE_KEY, Body=photo)
    source = decode(photo)

    async with running_app(s3_settings) as client:
        response = await client.get(PAGE_URL)
        served = {
            f"/r/trips/p-{width}.{ext}": await client.get(f"/r/trips/p-{width}.{ext}")
            for width in (360, 720, 1200, 2200)
            for ext in ("jpg", "webp")
        }

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["cache-control"] == "no-store"
    page = response.text
    assert f"Source: {source.width} × {source.height} pixels, JPEG, {len(photo):,} bytes." in page

    found = captions(page)
    assert sorted(found) == sorted(served)
    assert IMG_SRC.findall(page) == list(found)
    for url, variant in served.items():
        caption = found[url]
        width = int(url.rpartition("-")[2].partition(".")[0])
        assert variant.status_code == 200, url
        assert int(caption["width"]) == width, url
        assert int(caption["height"]) == aspect_height(photo, width), url
        # The page encodes as the variant route does, with the same settings.
        assert int(caption["bytes"].replace(",", "")) == len(variant.content), url
        assert float(caption["milliseconds"]) > 0, url


async def test_preview_markup_has_picture(s3, bucket, photo, s3_settings):
    s3.put_object(Bucket=bucket, Key=SOURCE_KEY, Body=photo)

    async with running_app(s3_settings) as client:
        response = await client.get(PAGE_URL)

    assert response.status_code == 200
    escaped = TEXTAREA.search(response.text)
    assert escaped is not None
    assert "&lt;picture&gt;" in escaped[1]
    assert "<picture>" not in escaped[1]
    markup = html.unescape(escaped[1])
    height = aspect_height(photo, 2200)
    webp = ",\n                  ".join(f"/r/trips/p-{w}.webp {w}w" for w in (360, 720, 1200, 2200))
    jpeg = ",\n               ".join(f"/r/trips/p-{w}.jpg {w}w" for w in (360, 720, 1200, 2200))
    assert markup == (
        "<picture>\n"
        '  <source type="image/webp" sizes="100vw"\n'
        f'          srcset="{webp}">\n'
        '  <img src="/r/trips/p-2200.jpg" sizes="100vw"\n'
        f'       srcset="{jpeg}"\n'
        f'       width="2200" height="{height}" alt="">\n'
        "</picture>"
    )


async def test_preview_markup_lists_size_once(s3, bucket, settings_for):
    # A 500 px source is not enlarged, so widths 720 and 1200 give the same image.
    s3.put_object(Bucket=bucket, Key="original/small.jpg", Body=make_image(500, 250))
    settings = settings_for(storage=f"s3://{bucket}", widths="360,720,1200", formats="jpg")

    async with running_app(settings) as client:
        response = await client.get("/preview/original/small.jpg")

    assert response.status_code == 200
    found = captions(response.text)
    assert [(m["width"], m["height"]) for m in found.values()] == [("360", "180"), ("500", "250"), ("500", "250")]
    markup = html.unescape(TEXTAREA.search(response.text)[1])
    assert "/r/small-360.jpg 360w" in markup
    assert "/r/small-720.jpg 500w" in markup
    assert "/r/small-1200.jpg" not in markup.partition("srcset=")[2]


async def test_preview_escapes_hostile_key(s3, bucket, s3_settings):
    key = 'original/<script>"&x.jpg'
    s3.put_object(Bucket=bucket, Key=key, Body=make_image(400, 300))

    async with running_app(s3_settings) as client:
        response = await client.get("/preview/original/%3Cscript%3E%22%26x.jpg")

    assert response.status_code == 200
    page = response.text
    assert "<script" not in page
    assert "&lt;script&gt;&quot;&amp;x.jpg" in page
    assert 'src="/r/%3Cscript%3E%22%26x-360.jpg"' in page
    assert "script-src" not in response.headers["content-security-policy"]
    assert "default-src 'none'" in response.headers["content-security-policy"]


async def test_preview_hostile_key_urls_work(s3, bucket, s3_settings):
    key = 'original/a b/<x>"&,%#?.jpg'
    s3.put_object(Bucket=bucket, Key=key, Body=make_image(400, 300))

    async with running_app(s3_settings) as client:
        page = await client.get("/preview/" + "original/a%20b/%3Cx%3E%22%26%2C%25%23%3F.jpg")
        urls = [html.unescape(url) for url in IMG_SRC.findall(page.text)]
        variants = [await client.get(url) for url in urls]

    assert page.status_code == 200
    assert len(urls) == 8
    for url, variant in zip(urls, variants):
        assert variant.status_code == 200, url


async def test_preview_off_returns_404(s3, bucket, photo, settings_for):
    s3.put_object(Bucket=bucket, Key=SOURCE_KEY, Body=photo)
    settings = settings_for(storage=f"s3://{bucket}", preview="0")

    async with running_app(settings) as client:
        response = await client.get(PAGE_URL)

    assert response.status_code == 404
    assert "PROXY_PREVIEW=1" in response.text
    assert response.headers["content-type"].startswith("text/plain")


async def test_preview_missing_source_returns_404(s3_settings):
    async with running_app(s3_settings) as client:
        response = await client.get("/preview/original/trips/absent.jpg")

    assert response.status_code == 404
    assert "original/trips/absent.jpg" in response.text
    assert "not found" in response.text


async def test_preview_outside_source_prefix_returns_404(s3, bucket, photo, s3_settings):
    s3.put_object(Bucket=bucket, Key="r/trips/p-720.jpg", Body=photo)

    async with running_app(s3_settings) as client:
        response = await client.get("/preview/r/trips/p-720.jpg")

    assert response.status_code == 404
    assert "source prefix 'original/'" in response.text


@pytest.mark.parametrize(
    "path",
    [
        # httpx resolves a literal "/../" before sending, so the dots are encoded.
        "/preview/original/%2e%2e/secret.jpg",
        "/preview/original/.%2E/.%2e/etc/passwd.jpg",
        "/preview/original/a%5C..%5Csecret.jpg",
        "/preview/original/a%00b.jpg",
        "/preview/original//p.jpg",
        "/preview/original/%ff.jpg",
        "/preview/original/" + "a" * 1100 + ".jpg",
    ],
)
async def test_preview_malformed_key_returns_400(path, s3_settings):
    async with running_app(s3_settings) as client:
        response = await client.get(path)

    assert response.status_code == 400


async def test_preview_non_image_returns_415(s3, bucket, s3_settings):
    s3.put_object(Bucket=bucket, Key="original/notes.jpg", Body=b"plain text, not an image\n" * 40)

    async with running_app(s3_settings) as client:
        response = await client.get("/preview/original/notes.jpg")

    assert response.status_code == 415
    assert "not an image" in response.text


async def test_preview_other_extension_returns_415(s3, bucket, s3_settings):
    s3.put_object(Bucket=bucket, Key="original/notes.txt", Body=make_image(40, 30))

    async with running_app(s3_settings) as client:
        response = await client.get("/preview/original/notes.txt")

    assert response.status_code == 415
    assert "source extension" in response.text


async def test_preview_large_source_returns_413(s3, bucket, photo, settings_for):
    s3.put_object(Bucket=bucket, Key=SOURCE_KEY, Body=photo)
    settings = settings_for(storage=f"s3://{bucket}", max_source_mb="0.01")

    async with running_app(settings) as client:
        response = await client.get(PAGE_URL)

    assert response.status_code == 413
    assert "PROXY_MAX_SOURCE_MB" in response.text


async def test_preview_writes_nothing(s3, bucket, photo, s3_settings):
    s3.put_object(Bucket=bucket, Key=SOURCE_KEY, Body=photo)
    counting = CountingStore(await open_store(s3_settings))

    async with running_app(s3_settings, counting) as client:
        response = await client.get(PAGE_URL)

    assert response.status_code == 200
    assert counting.count("get", SOURCE_KEY) == 1
    assert counting.count("put") == 0
    assert counting.count("delete") == 0
    listing = s3.list_objects_v2(Bucket=bucket, Prefix="r/")
    assert listing.get("Contents", []) == []


async def test_preview_notes_other_source(s3, bucket, photo, s3_settings):
    # The WebP variant URLs prefer p.webp, so the page notes that they show that file.
    s3.put_object(Bucket=bucket, Key=SOURCE_KEY, Body=photo)
    s3.put_object(Bucket=bucket, Key="original/trips/p.webp", Body=make_image(300, 200, ".webp"))

    async with running_app(s3_settings) as client:
        response = await client.get(PAGE_URL)

    assert response.status_code == 200
    assert "The WebP variant URLs are made from <code>original/trips/p.webp</code>" in response.text
    assert "The JPEG variant URLs" not in response.text


class GatedStore(CountingStore):
    """Hold each `get` of `key` until `release` is set, and set `reached` when one waits."""

    def __init__(self, inner, key: str) -> None:
        super().__init__(inner)
        self.key = key
        self.reached = asyncio.Event()
        self.release = asyncio.Event()

    async def get(self, key, max_bytes=None, *, need_etag=True):
        if key == self.key:
            self.reached.set()
            await self.release.wait()
        return await super().get(key, max_bytes, need_etag=need_etag)


async def test_preview_second_at_once_returns_503(s3, bucket, photo, s3_settings):
    s3.put_object(Bucket=bucket, Key=SOURCE_KEY, Body=photo)
    gated = GatedStore(await open_store(s3_settings), SOURCE_KEY)

    async with running_app(s3_settings, gated) as client:
        first = asyncio.create_task(client.get(PAGE_URL))
        await asyncio.wait_for(gated.reached.wait(), timeout=30)
        second = await asyncio.wait_for(client.get(PAGE_URL), timeout=30)
        gated.release.set()
        first_response = await asyncio.wait_for(first, timeout=60)
        third = await client.get(PAGE_URL)

    assert second.status_code == 503
    assert second.headers["retry-after"] == "1"
    assert "another preview page" in second.text
    assert first_response.status_code == 200
    assert third.status_code == 200


async def test_preview_shows_orientation(s3, bucket, settings_for):
    # EXIF orientation 6 turns the stored 400 × 200 image upright as 200 × 400.
    image = decode(make_image(400, 200)).copy()
    image.set_type(pyvips.GValue.gint_type, "orientation", 6)
    s3.put_object(Bucket=bucket, Key="original/turned.jpg", Body=image.write_to_buffer(".jpg"))
    settings = settings_for(storage=f"s3://{bucket}", widths="100", formats="jpg")

    async with running_app(settings) as client:
        response = await client.get("/preview/original/turned.jpg")

    assert response.status_code == 200
    assert "400 × 200 pixels as stored (EXIF orientation 6, which the variants apply)" in response.text
    assert [(m["width"], m["height"]) for m in captions(response.text).values()] == [("100", "200")]


async def test_variant_prefix_preview_keeps_variants(s3, bucket, photo, settings_for):
    s3.put_object(Bucket=bucket, Key=SOURCE_KEY, Body=photo)
    settings = settings_for(storage=f"s3://{bucket}", variant_prefix="preview/")

    async with running_app(settings) as client:
        response = await client.get("/preview/trips/p-360.jpg")

    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert decode(response.content).width == 360
