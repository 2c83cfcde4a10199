"""The request path end to end: moto's S3 server over HTTP, real libvips, real photos."""

import asyncio
import logging
import re
import resource
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime, parsedate_to_datetime

import pytest
from conftest import CountingStore, GatedStore, decode, make_image, running_app

from proxy import access_log
from proxy import app as app_module
from proxy.store import open_store
from proxy import variants as variants_module
from proxy.variants import VariantService


@pytest.fixture
def s3_settings(bucket, settings_for):
    return settings_for(storage=f"s3://{bucket}")


def aspect_height(source: bytes, width: int) -> int:
    image = decode(source)
    return max(1, round(image.height * width / image.width))


def variant_keys(s3, bucket) -> list[str]:
    listing = s3.list_objects_v2(Bucket=bucket, Prefix="r/")
    return [item["Key"] for item in listing.get("Contents", [])]


async def test_first_request_makes_and_stores_variant(s3, bucket, photo, s3_settings):
    s3.put_object(Bucket=bucket, Key="original/a/b/photo.jpg", Body=photo, ContentType="image/jpeg")

    async with running_app(s3_settings) as client:
        response = await client.get("/r/a/b/photo-720.jpg")

    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    image = decode(response.content)
    assert image.get("vips-loader") == "jpegload_buffer"
    assert image.width == 720
    assert image.height == aspect_height(photo, 720)

    stored = s3.get_object(Bucket=bucket, Key="r/a/b/photo-720.jpg")
    assert stored["ContentType"] == "image/jpeg"
    assert stored["CacheControl"] == "public, max-age=31536000, immutable"
    assert stored["Body"].read() == response.content


async def test_variant_has_no_exif_or_gps(s3, bucket, photo, s3_settings):
    source = decode(photo)
    assert source.get_typeof("exif-data") != 0, "the test photo must carry EXIF"
    s3.put_object(Bucket=bucket, Key="original/a/b/photo.jpg", Body=photo)

    async with running_app(s3_settings) as client:
        response = await client.get("/r/a/b/photo-720.jpg")

    assert response.status_code == 200
    image = decode(response.content)
    metadata = [name for name in image.get_fields() if name.startswith(("exif-", "xmp-", "iptc-", "icc-"))]
    assert metadata == []
    assert b"Exif\x00\x00" not in response.content
    assert b"TestCamera" not in response.content


async def test_test_photo_carries_gps(photo):
    # Guards the test above: the source really has GPS tags to strip.
    source = decode(photo)
    assert source.get("exif-ifd3-GPSLatitudeRef").startswith("N")


async def test_persistent_cache_serves_after_source_deleted(s3, bucket, photo, s3_settings):
    s3.put_object(Bucket=bucket, Key="original/a/b/photo.jpg", Body=photo)
    async with running_app(s3_settings) as client:
        first = await client.get("/r/a/b/photo-720.jpg")
    assert first.status_code == 200

    s3.delete_object(Bucket=bucket, Key="original/a/b/photo.jpg")

    # A new app starts with an empty memory cache, so this copy comes from S3.
    async with running_app(s3_settings) as client:
        second = await client.get("/r/a/b/photo-720.jpg")
    assert second.status_code == 200
    assert second.content == first.content
    assert second.headers["etag"] == first.headers["etag"]


@pytest.mark.parametrize(
    ("ext", "content_type", "loader"),
    [
        ("webp", "image/webp", "webpload_buffer"),
        ("png", "image/png", "pngload_buffer"),
        ("avif", "image/avif", "heifload_buffer"),
        ("jpeg", "image/jpeg", "jpegload_buffer"),
    ],
)
async def test_output_formats_from_jpeg(s3, bucket, photo, s3_settings, ext, content_type, loader):
    s3.put_object(Bucket=bucket, Key="original/a/b/photo.jpg", Body=photo)

    async with running_app(s3_settings) as client:
        response = await client.get(f"/r/a/b/photo-360.{ext}")

    assert response.status_code == 200
    assert response.headers["content-type"] == content_type
    image = decode(response.content)
    assert image.get("vips-loader") == loader
    assert image.width == 360
    assert image.height == aspect_height(photo, 360)
    assert s3.head_object(Bucket=bucket, Key=f"r/a/b/photo-360.{ext}")["ContentType"] == content_type


async def test_uppercase_source_extension_found(s3, bucket, photo, s3_settings):
    s3.put_object(Bucket=bucket, Key="original/a/b/IMG_0001.JPG", Body=photo)

    async with running_app(s3_settings) as client:
        response = await client.get("/r/a/b/IMG_0001-360.webp")

    assert response.status_code == 200
    assert response.headers["content-type"] == "image/webp"
    assert decode(response.content).width == 360
    assert variant_keys(s3, bucket) == ["r/a/b/IMG_0001-360.webp"]


async def test_octet_stream_source_recognised(s3, bucket, photo, s3_settings):
    s3.put_object(
        Bucket=bucket, Key="original/a/b/photo.jpg", Body=photo, ContentType="binary/octet-stream"
    )

    async with running_app(s3_settings) as client:
        response = await client.get("/r/a/b/photo-720.jpg")

    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert s3.head_object(Bucket=bucket, Key="r/a/b/photo-720.jpg")["ContentType"] == "image/jpeg"


async def test_source_format_read_from_bytes(s3, bucket, s3_settings):
    # A PNG uploaded under a .jpg name is still decoded as PNG.
    s3.put_object(Bucket=bucket, Key="original/misnamed.jpg", Body=make_image(800, 400, ".png"))

    async with running_app(s3_settings) as client:
        response = await client.get("/r/misnamed-360.jpg")

    assert response.status_code == 200
    image = decode(response.content)
    assert (image.width, image.height) == (360, 180)


async def test_width_not_allowed_writes_nothing(s3, bucket, photo, s3_settings):
    s3.put_object(Bucket=bucket, Key="original/a/b/photo.jpg", Body=photo)
    counting = CountingStore(await open_store(s3_settings))

    async with running_app(s3_settings, counting) as client:
        response = await client.get("/r/a/b/photo-700.jpg")

    assert response.status_code == 404
    assert "700" in response.text
    assert counting.calls == []
    assert variant_keys(s3, bucket) == []


async def test_only_last_number_is_width(s3, bucket, s3_settings):
    # Two sources with different shapes show which one was used.
    s3.put_object(Bucket=bucket, Key="original/a/img-800.jpg", Body=make_image(800, 400))
    s3.put_object(Bucket=bucket, Key="original/a/img.jpg", Body=make_image(800, 800))

    async with running_app(s3_settings) as client:
        response = await client.get("/r/a/img-800-360.jpg")

    assert response.status_code == 200
    image = decode(response.content)
    assert (image.width, image.height) == (360, 180)
    assert variant_keys(s3, bucket) == ["r/a/img-800-360.jpg"]


async def test_narrow_source_not_enlarged(s3, bucket, s3_settings):
    s3.put_object(Bucket=bucket, Key="original/small.png", Body=make_image(100, 80, ".png"))

    async with running_app(s3_settings) as client:
        response = await client.get("/r/small-720.jpg")

    assert response.status_code == 200
    image = decode(response.content)
    assert (image.width, image.height) == (100, 80)


async def test_portrait_gets_exact_width(s3, bucket, s3_settings):
    # libvips' thumbnail fits a square box by default, which would make this 720 tall.
    s3.put_object(Bucket=bucket, Key="original/tall.jpg", Body=make_image(1000, 3000))

    async with running_app(s3_settings) as client:
        response = await client.get("/r/tall-720.jpg")

    image = decode(response.content)
    assert (image.width, image.height) == (720, 2160)


async def test_concurrent_requests_make_variant_once(s3, bucket, photo, s3_settings):
    s3.put_object(Bucket=bucket, Key="original/a/b/photo.jpg", Body=photo)
    counting = CountingStore(await open_store(s3_settings))

    async with running_app(s3_settings, counting) as client:
        responses = await asyncio.gather(*(client.get("/r/a/b/photo-720.jpg") for _ in range(10)))

    assert [response.status_code for response in responses] == [200] * 10
    assert len({response.content for response in responses}) == 1
    assert counting.count("get", "original/a/b/photo.jpg") == 1
    assert counting.count("put", "r/a/b/photo-720.jpg") == 1
    assert counting.count("put") == 1


async def test_hot_variant_served_from_memory(s3, bucket, photo, s3_settings):
    s3.put_object(Bucket=bucket, Key="original/a/b/photo.jpg", Body=photo)
    counting = CountingStore(await open_store(s3_settings))

    async with running_app(s3_settings, counting) as client:
        first = await client.get("/r/a/b/photo-720.jpg")
        calls_after_first = len(counting.calls)
        second = await client.get("/r/a/b/photo-720.jpg")

    assert second.status_code == 200
    assert second.content == first.content
    assert len(counting.calls) == calls_after_first


def memory_hits(metrics_page: str) -> float:
    match = re.search(r'^resize_proxy_variants_served_total\{layer="memory"\} (\S+)$', metrics_page, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


RESPONSE_HEADERS = ("content-type", "content-length", "etag", "last-modified", "cache-control")


async def test_memory_hit_skips_routing_same_headers(s3, bucket, photo, s3_settings, monkeypatch):
    s3.put_object(Bucket=bucket, Key="original/a/b/photo.jpg", Body=photo)
    routed = []
    original = VariantService.cached
    monkeypatch.setattr(VariantService, "cached", lambda self, key: routed.append(key) or original(self, key))

    async with running_app(s3_settings) as client:
        first = await client.get("/r/a/b/photo-720.jpg")
        routed_before = len(routed)
        second = await client.get("/r/a/b/photo-720.jpg?width=9999")
        head = await client.head("/r/a/b/photo-720.jpg")

    # Only the first request went through the router, which consults the cache.
    assert routed_before > 0
    assert len(routed) == routed_before
    assert second.status_code == 200
    assert second.content == first.content
    assert [second.headers[name] for name in RESPONSE_HEADERS] == [first.headers[name] for name in RESPONSE_HEADERS]
    assert second.headers["x-request-id"] != first.headers["x-request-id"]
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == first.headers["content-length"]


async def test_memory_hit_skips_middleware(s3, bucket, photo, s3_settings):
    s3.put_object(Bucket=bucket, Key="original/a/b/photo.jpg", Body=photo)
    through_middleware = []

    class Recorder:
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http":
                through_middleware.append((scope["method"], scope["path"]))
            await self.app(scope, receive, send)

    async with running_app(s3_settings) as client:
        client.app.add_middleware(Recorder)
        first = await client.get("/r/a/b/photo-720.jpg")
        hit = await client.get("/r/a/b/photo-720.jpg")
        head = await client.head("/r/a/b/photo-720.jpg")
        conditional = await client.get("/r/a/b/photo-720.jpg", headers={"If-None-Match": first.headers["etag"]})

    assert [first.status_code, hit.status_code, head.status_code, conditional.status_code] == [200, 200, 200, 304]
    assert hit.content == first.content
    # Only the miss and the conditional request went through the middleware.
    assert through_middleware == [("GET", "/r/a/b/photo-720.jpg")] * 2


async def test_memory_lookup_bug_uses_full_path(s3, bucket, photo, s3_settings, monkeypatch, caplog):
    s3.put_object(Bucket=bucket, Key="original/a/b/photo.jpg", Body=photo)

    def broken(*arguments):
        raise RuntimeError("simulated bug")

    async with running_app(s3_settings) as client:
        first = await client.get("/r/a/b/photo-720.jpg")
        monkeypatch.setattr(app_module, "memory_hit", broken)
        second = await client.get("/r/a/b/photo-720.jpg")

    assert second.status_code == 200
    assert second.content == first.content
    assert "unexpected error looking up the memory cache path=/r/a/b/photo-720.jpg" in caplog.text


async def test_memory_hit_send_failure_logged(caplog):
    scope = {"type": "http", "method": "GET", "path": "/r/p-720.jpg", "raw_path": b"/r/p-720.jpg", "headers": []}

    async def rejecting_send(message):
        raise RuntimeError("Invalid HTTP header value.")

    await access_log.send_logged(scope, rejecting_send, (), b"body", "memory", "variant")

    lines = [record.getMessage() for record in caplog.records if record.name == "proxy.access_log"]
    assert any(line.startswith("unexpected error id=") for line in lines)
    assert any("status=500" in line and 'error="unexpected RuntimeError"' in line for line in lines)


async def test_memory_hit_logged_and_counted(s3, bucket, photo, s3_settings, caplog):
    s3.put_object(Bucket=bucket, Key="original/a/b/photo.jpg", Body=photo)
    caplog.set_level(logging.INFO, logger="proxy.access_log")

    async with running_app(s3_settings) as client:
        await client.get("/r/a/b/photo-720.jpg")
        before = memory_hits((await client.get("/metrics")).text)
        hit = await client.get("/r/a/b/photo-720.jpg")
        after = memory_hits((await client.get("/metrics")).text)

    lines = [record.getMessage() for record in caplog.records if record.name == "proxy.access_log"]
    hit_line = next(line for line in lines if f"id={hit.headers['x-request-id']}" in line)
    assert "method=GET path=/r/a/b/photo-720.jpg status=200" in hit_line
    assert "layer=memory" in hit_line
    # The counters belong to the test process, which other tests share.
    assert after - before == 1


async def test_memory_hit_validates_request_id(s3, bucket, photo, s3_settings, caplog):
    s3.put_object(Bucket=bucket, Key="original/a/b/photo.jpg", Body=photo)
    caplog.set_level(logging.INFO, logger="proxy.access_log")

    async with running_app(s3_settings) as client:
        await client.get("/r/a/b/photo-720.jpg")
        kept = await client.get("/r/a/b/photo-720.jpg", headers={"X-Request-ID": "edge-42"})
        replaced = await client.get("/r/a/b/photo-720.jpg", headers={"X-Request-ID": "has space"})
        conditional = await client.get(
            "/r/a/b/photo-720.jpg", headers={"X-Request-ID": "edge-43", "If-None-Match": kept.headers["etag"]}
        )

    assert kept.headers["x-request-id"] == "edge-42"
    assert re.fullmatch(r"[0-9a-f]{32}", replaced.headers["x-request-id"])
    assert (conditional.status_code, conditional.headers["x-request-id"]) == (304, "edge-43")
    lines = [record.getMessage() for record in caplog.records if record.name == "proxy.access_log"]
    assert any(line.startswith("request id=edge-42 ") and "layer=memory" in line for line in lines)
    replaced_line = f"request id={replaced.headers['x-request-id']} "
    assert any(line.startswith(replaced_line) and "layer=memory" in line for line in lines)


async def test_conditional_memory_hit_takes_full_path(s3, bucket, photo, s3_settings):
    s3.put_object(Bucket=bucket, Key="original/a/b/photo.jpg", Body=photo)
    async with running_app(s3_settings) as client:
        first = await client.get("/r/a/b/photo-720.jpg")
        other = await client.get("/r/a/b/photo-720.jpg", headers={"If-None-Match": '"other"'})
        same = await client.get("/r/a/b/photo-720.jpg", headers={"if-none-match": first.headers["etag"]})

    assert other.status_code == 200
    assert other.content == first.content
    assert same.status_code == 304


async def test_if_none_match_returns_304(s3, bucket, photo, s3_settings):
    s3.put_object(Bucket=bucket, Key="original/a/b/photo.jpg", Body=photo)
    async with running_app(s3_settings) as client:
        first = await client.get("/r/a/b/photo-720.jpg")
        etag = first.headers["etag"]
        from_memory = await client.get("/r/a/b/photo-720.jpg", headers={"If-None-Match": etag})

    assert from_memory.status_code == 304
    assert from_memory.content == b""
    assert from_memory.headers["etag"] == etag


async def test_304_from_store_loads_no_image(s3, bucket, photo, s3_settings):
    s3.put_object(Bucket=bucket, Key="original/a/b/photo.jpg", Body=photo)
    async with running_app(s3_settings) as client:
        etag = (await client.get("/r/a/b/photo-720.jpg")).headers["etag"]

    # A new app has an empty memory cache: the ETag must come from a HEAD alone.
    counting = CountingStore(await open_store(s3_settings))
    async with running_app(s3_settings, counting) as client:
        response = await client.get("/r/a/b/photo-720.jpg", headers={"If-None-Match": etag})

    assert response.status_code == 304
    assert counting.count("get") == 0
    assert counting.count("head", "r/a/b/photo-720.jpg") == 1


async def test_client_conditions_not_sent_to_store(s3, bucket, photo, s3_settings):
    s3.put_object(Bucket=bucket, Key="original/a/b/photo.jpg", Body=photo)
    async with running_app(s3_settings) as client:
        first = await client.get("/r/a/b/photo-720.jpg")

    # Passed on to S3, If-Match would fail with 412 and a later If-Modified-Since
    # with 304; the proxy must return the full variant instead.
    future = format_datetime(datetime.now(timezone.utc) + timedelta(days=1), usegmt=True)
    headers = {"If-Match": '"no-such-etag"', "If-Modified-Since": future, "If-None-Match": '"other"'}
    async with running_app(s3_settings) as client:
        response = await client.get("/r/a/b/photo-720.jpg", headers=headers)

    assert response.status_code == 200
    assert response.content == first.content


async def test_head_matches_get_without_body(s3, bucket, photo, s3_settings):
    s3.put_object(Bucket=bucket, Key="original/a/b/photo.jpg", Body=photo)

    async with running_app(s3_settings) as client:
        head_first = await client.head("/r/a/b/photo-720.webp")
        get = await client.get("/r/a/b/photo-720.webp")

    assert head_first.status_code == 200
    assert head_first.content == b""
    for name in ("content-type", "content-length", "etag", "last-modified", "cache-control"):
        assert head_first.headers[name] == get.headers[name], name
    assert int(get.headers["content-length"]) == len(get.content)


async def test_variant_headers(s3, bucket, photo, s3_settings):
    s3.put_object(Bucket=bucket, Key="original/a/b/photo.jpg", Body=photo)

    async with running_app(s3_settings) as client:
        response = await client.get("/r/a/b/photo-720.jpg")

    assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert response.headers["etag"].startswith('"')
    assert parsedate_to_datetime(response.headers["last-modified"]).tzinfo is not None
    assert response.headers["x-request-id"]


async def test_cache_control_configurable(bucket, s3, photo, settings_for):
    settings = settings_for(storage=f"s3://{bucket}", cache_control="public, max-age=600")
    s3.put_object(Bucket=bucket, Key="original/p.jpg", Body=photo)

    async with running_app(settings) as client:
        response = await client.get("/r/p-360.jpg")

    assert response.headers["cache-control"] == "public, max-age=600"
    assert s3.head_object(Bucket=bucket, Key="r/p-360.jpg")["CacheControl"] == "public, max-age=600"


async def test_missing_source_returns_404(s3, bucket, s3_settings):
    async with running_app(s3_settings) as client:
        response = await client.get("/r/a/b/nothing-720.jpg")

    assert response.status_code == 404
    assert response.headers["content-type"].startswith("text/plain")
    assert response.headers["cache-control"] == "public, max-age=60"
    assert "original/a/b/nothing" in response.text
    assert variant_keys(s3, bucket) == []


async def test_missing_source_remembered_for_lookup_ttl(s3, bucket, photo, settings_for):
    settings = settings_for(storage=f"s3://{bucket}", lookup_ttl="3600")
    counting = CountingStore(await open_store(settings))

    async with running_app(settings, counting) as client:
        first = await client.get("/r/late-360.jpg")
        calls = len(counting.calls)
        s3.put_object(Bucket=bucket, Key="original/late.jpg", Body=photo)
        second = await client.get("/r/late-360.webp")

    assert first.status_code == 404
    assert second.status_code == 404
    # Only the variant's own store lookup runs; the source miss is remembered.
    assert counting.calls[calls:] == [("get", "r/late-360.webp")]


async def test_source_found_after_upload_without_ttl(s3, bucket, photo, settings_for):
    settings = settings_for(storage=f"s3://{bucket}", lookup_ttl="0")

    async with running_app(settings) as client:
        first = await client.get("/r/late-360.jpg")
        s3.put_object(Bucket=bucket, Key="original/late.jpg", Body=photo)
        second = await client.get("/r/late-360.jpg")

    assert first.status_code == 404
    assert second.status_code == 200


async def test_found_source_key_remembered(s3, bucket, photo, s3_settings):
    s3.put_object(Bucket=bucket, Key="original/p.PNG", Body=make_image(400, 200, ".png"))
    counting = CountingStore(await open_store(s3_settings))

    async with running_app(s3_settings, counting) as client:
        await client.get("/r/p-360.jpg")
        calls = len(counting.calls)
        await client.get("/r/p-720.jpg")

    # The second variant goes straight to the remembered key: no list.
    assert counting.count("list") == 1
    assert ("get", "original/p.PNG") in counting.calls[calls:]


@pytest.mark.parametrize(
    "path",
    [
        # httpx resolves a literal "/../" before sending, so the dots are encoded.
        "/r/a/.%2e/original/a/b/photo-720.jpg",
        "/r/%2e%2e/original/a/b/photo-720.jpg",
        "/r/a/%2E%2E/%2E%2E/etc/passwd-720.jpg",
        "/r//a/b/photo-720.jpg",
        "/r/a%2F%2Fb/photo-720.jpg",
        "/r/a%5Cb/photo-720.jpg",
        "/r/a/b/photo%00-720.jpg",
        "/r/a/b/%ff-720.jpg",
    ],
)
async def test_hostile_path_rejected_without_store(s3_settings, path):
    # Traversal, empty segments, backslashes, NUL and invalid UTF-8 must be
    # rejected before any store call, since a store could resolve them elsewhere.
    counting = CountingStore(await open_store(s3_settings))

    async with running_app(s3_settings, counting) as client:
        response = await client.get(path)

    assert response.status_code == 400
    assert counting.calls == []


async def test_overlong_key_rejected(s3_settings):
    counting = CountingStore(await open_store(s3_settings))
    path = "/r/" + "a" * 1100 + "-720.jpg"

    async with running_app(s3_settings, counting) as client:
        response = await client.get(path)

    assert response.status_code == 400
    assert "1024" in response.text
    assert counting.calls == []


async def test_undecodable_source_returns_415(s3, bucket, s3_settings):
    s3.put_object(Bucket=bucket, Key="original/junk.jpg", Body=b"this is not an image" * 50)

    async with running_app(s3_settings) as client:
        response = await client.get("/r/junk-360.jpg")

    assert response.status_code == 415
    assert variant_keys(s3, bucket) == []


async def test_truncated_source_returns_422_and_stores_nothing(s3, bucket, photo, s3_settings):
    s3.put_object(Bucket=bucket, Key="original/cut.jpg", Body=photo[: len(photo) * 6 // 10])

    async with running_app(s3_settings) as client:
        response = await client.get("/r/cut-360.jpg")
        again = await client.get("/r/cut-360.jpg")

    assert response.status_code == 422
    assert again.status_code == 422
    assert variant_keys(s3, bucket) == []




async def test_local_store_serves_same_variant(tmp_path, photo, settings_for):
    source = tmp_path / "original" / "a" / "b" / "photo.jpg"
    source.parent.mkdir(parents=True)
    source.write_bytes(photo)
    settings = settings_for(storage=str(tmp_path))

    async with running_app(settings) as client:
        response = await client.get("/r/a/b/photo-720.jpg")
        head = await client.head("/r/a/b/photo-720.jpg")

    assert response.status_code == 200
    assert decode(response.content).width == 720
    assert (tmp_path / "r" / "a" / "b" / "photo-720.jpg").read_bytes() == response.content
    assert head.headers["etag"] == response.headers["etag"]


def with_claimed_size(jpeg: bytes, width: int, height: int) -> bytes:
    """Rewrite the frame header so the JPEG claims another size; the data stays small."""
    frame = jpeg.index(b"\xff\xc0")
    header = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return jpeg[: frame + 5] + header + jpeg[frame + 9 :]


async def test_pixel_bomb_rejected_from_header(s3, bucket, s3_settings):
    # A few KB that claim 64250×64250 pixels must not be decoded.
    bomb = with_claimed_size(make_image(64, 64), 64250, 64250)
    assert len(bomb) < 20_000
    s3.put_object(Bucket=bucket, Key="original/bomb.jpg", Body=bomb)

    async with running_app(s3_settings) as client:
        response = await client.get("/r/bomb-360.jpg")

    assert response.status_code == 413
    assert "64250×64250" in response.text
    assert "PROXY_MAX_PIXELS" in response.text
    assert variant_keys(s3, bucket) == []


async def test_source_over_byte_limit_rejected(s3, bucket, photo, settings_for):
    settings = settings_for(storage=f"s3://{bucket}", max_source_mb="0.05")
    s3.put_object(Bucket=bucket, Key="original/big.jpg", Body=photo)

    async with running_app(settings) as client:
        response = await client.get("/r/big-360.jpg")

    assert response.status_code == 413
    assert "PROXY_MAX_SOURCE_MB" in response.text
    assert variant_keys(s3, bucket) == []


async def test_memory_cache_bounded_in_bytes(s3, bucket, photo, settings_for):
    settings = settings_for(storage=f"s3://{bucket}", memory_cache_mb="0.25")
    s3.put_object(Bucket=bucket, Key="original/p.jpg", Body=photo)
    paths = [f"/r/p-{width}.{ext}" for width in (360, 720, 1200) for ext in ("jpg", "webp", "png")]

    async with running_app(settings) as client:
        responses = [await client.get(path) for path in paths]
        memory = client.app.state.variants.memory
        cached_bytes = memory.currsize
        cached_keys = list(memory.keys())

    assert [response.status_code for response in responses] == [200] * len(paths)
    assert sum(len(response.content) for response in responses) > 256 * 1024
    assert 0 < cached_bytes <= 256 * 1024
    assert len(cached_keys) < len(paths)


async def test_memory_cache_off_still_serves(s3, bucket, photo, settings_for):
    settings = settings_for(storage=f"s3://{bucket}", memory_cache_mb="0")
    s3.put_object(Bucket=bucket, Key="original/p.jpg", Body=photo)

    async with running_app(settings) as client:
        first = await client.get("/r/p-360.jpg")
        second = await client.get("/r/p-360.jpg")
        cached = len(client.app.state.variants.memory)

    assert first.status_code == 200
    assert second.content == first.content
    assert cached == 0


class BrokenStore(CountingStore):
    async def get(self, key, max_bytes=None, *, need_etag=True):
        raise RuntimeError("simulated programming error")


async def test_unexpected_error_gives_short_500(s3_settings, caplog):
    store = BrokenStore(await open_store(s3_settings))

    async with running_app(s3_settings, store) as client:
        response = await client.get("/r/a/b/photo-720.jpg")

    assert response.status_code == 500
    assert "Traceback" not in response.text
    assert response.headers["cache-control"] == "no-store"
    assert "simulated programming error" in caplog.text


async def test_request_logged_with_id_status_layer(s3, bucket, photo, s3_settings, caplog):
    s3.put_object(Bucket=bucket, Key="original/p.jpg", Body=photo)
    caplog.set_level("INFO", logger="proxy")

    async with running_app(s3_settings) as client:
        await client.get("/r/p-360.jpg", headers={"X-Request-ID": "req-123"})
        missing = await client.get("/r/none-360.jpg")

    lines = [record.getMessage() for record in caplog.records if record.name == "proxy.access_log"]
    assert any("id=req-123" in line and "status=200" in line and "layer=generated" in line for line in lines)
    assert any("status=404" in line and "original/none.* not found" in line for line in lines)
    assert missing.headers["x-request-id"]


async def test_disconnected_client_does_not_cancel_others(s3, bucket, photo, s3_settings):
    s3.put_object(Bucket=bucket, Key="original/a/b/photo.jpg", Body=photo)
    counting = CountingStore(await open_store(s3_settings))

    async with running_app(s3_settings, counting) as client:
        leaving = asyncio.ensure_future(client.get("/r/a/b/photo-1200.jpg"))
        staying = asyncio.ensure_future(client.get("/r/a/b/photo-1200.jpg"))
        # Let both requests join the same generation, then drop the first one.
        while counting.count("get", "original/a/b/photo.jpg") == 0:
            await asyncio.sleep(0.005)
        leaving.cancel()
        response = await staying

    assert response.status_code == 200
    assert decode(response.content).width == 1200
    assert counting.count("put") == 1


async def test_variant_path_never_names_variant_source(s3, bucket, photo, settings_for):
    # With the whole bucket as source prefix, `r/r/p-720-360.jpg` would resize
    # the stored variant `r/p-720.jpg` again.
    settings = settings_for(storage=f"s3://{bucket}", source_prefix="")
    s3.put_object(Bucket=bucket, Key="p.jpg", Body=photo)

    async with running_app(settings) as client:
        made = await client.get("/r/p-720.jpg")
        nested = await client.get("/r/r/p-720-360.jpg")

    assert made.status_code == 200
    assert nested.status_code == 404
    assert "variant prefix" in nested.text
    assert variant_keys(s3, bucket) == ["r/p-720.jpg"]



async def test_other_extension_lookup_lists_without_get(s3, bucket, s3_settings):
    for name in ("one", "two", "three"):
        s3.put_object(Bucket=bucket, Key=f"original/{name}.jpg", Body=make_image(400, 300))
    counting = CountingStore(await open_store(s3_settings))

    async with running_app(s3_settings, counting) as client:
        first = await client.get("/r/one-360.webp")
        calls_after_first = list(counting.calls)
        second = await client.get("/r/two-360.webp")
        same_extension = await client.get("/r/three-360.jpg")

    assert [first.status_code, second.status_code, same_extension.status_code] == [200, 200, 200]
    # The first lookup tries original/one.webp, then lists.
    assert ("get", "original/one.webp") in calls_after_first
    assert ("list", "original/one.") in calls_after_first
    # Having found a .jpg for a .webp variant, the next lookup lists first.
    assert counting.count("get", "original/two.webp") == 0
    assert counting.count("list", "original/two.") == 1
    assert counting.count("get", "original/two.jpg") == 1
    # A .jpg variant still tries its own extension first, with no listing.
    assert counting.count("get", "original/three.jpg") == 1
    assert counting.count("list", "original/three.") == 0


async def test_listing_first_still_prefers_own_extension(s3, bucket, s3_settings):
    s3.put_object(Bucket=bucket, Key="original/a.jpg", Body=make_image(400, 300))
    s3.put_object(Bucket=bucket, Key="original/b.jpg", Body=make_image(400, 300))
    s3.put_object(Bucket=bucket, Key="original/b.webp", Body=make_image(200, 100, ".webp"))

    async with running_app(s3_settings) as client:
        await client.get("/r/a-360.webp")
        response = await client.get("/r/b-360.webp")
        uses_own = client.app.state.variants.own_extension_found["webp"]

    # b.webp (200 px wide) wins over b.jpg (400 px wide), as without the listing first.
    assert decode(response.content).width == 200
    assert uses_own is True


async def test_same_stem_sources_chosen_by_extension(s3, bucket, settings_for):
    # Red JPEG and blue PNG under one stem: each output extension picks its own
    # source, whatever the order of the requests.
    red = decode(make_image(400, 200)).new_from_image([255, 0, 0]).jpegsave_buffer()
    blue = decode(make_image(400, 200)).new_from_image([0, 0, 255]).pngsave_buffer()
    for stem in ("first", "second"):
        s3.put_object(Bucket=bucket, Key=f"original/{stem}.jpg", Body=red)
        s3.put_object(Bucket=bucket, Key=f"original/{stem}.png", Body=blue)
    settings = settings_for(storage=f"s3://{bucket}")

    async with running_app(settings) as client:
        png_then_jpg = [await client.get(f"/r/first-360.{ext}") for ext in ("png", "jpg", "webp")]
        jpg_then_png = [await client.get(f"/r/second-360.{ext}") for ext in ("jpg", "png", "webp")]

    def red_level(response):
        return decode(response.content).extract_band(0).avg()

    assert red_level(png_then_jpg[0]) < 20
    assert red_level(png_then_jpg[1]) > 230
    assert red_level(jpg_then_png[0]) > 230
    assert red_level(jpg_then_png[1]) < 20
    # Another format takes the first of jpg, jpeg, png, ... that exists.
    assert red_level(png_then_jpg[2]) > 230
    assert red_level(jpg_then_png[2]) > 230


async def test_full_resize_queue_returns_503(s3, bucket, settings_for):
    s3.put_object(Bucket=bucket, Key="original/p.jpg", Body=make_image(800, 600))
    settings = settings_for(storage=f"s3://{bucket}", resize_queue="1")
    store = GatedStore(await open_store(settings))

    async with running_app(settings, store) as client:
        first = asyncio.ensure_future(client.get("/r/p-360.jpg"))
        await asyncio.wait_for(store.writing.wait(), 30)
        second = await client.get("/r/p-720.jpg")
        store.release.set()
        first_response = await first
        after = await client.get("/r/p-720.jpg")

    assert second.status_code == 503
    assert second.headers["retry-after"] == "1"
    assert "PROXY_RESIZE_QUEUE" in second.text
    assert first_response.status_code == 200
    assert after.status_code == 200


async def test_oversized_source_not_read(s3, bucket, settings_for):
    settings = settings_for(storage=f"s3://{bucket}", max_source_mb="1")
    s3.put_object(Bucket=bucket, Key="original/big.jpg", Body=b"\xff\xd8\xff" + bytes(2 * 1024 * 1024))
    counting = CountingStore(await open_store(settings))

    async with running_app(settings, counting) as client:
        response = await client.get("/r/big-360.jpg")

    assert response.status_code == 413
    assert "2097155 bytes" in response.text


async def test_oversized_local_source_never_loaded(tmp_path, settings_for):
    # A sparse 4 GiB file: reading it whole would raise peak memory by gigabytes.
    source = tmp_path / "original" / "huge.jpg"
    source.parent.mkdir(parents=True)
    with source.open("wb") as file:
        file.truncate(4 * 1024**3)
    settings = settings_for(storage=str(tmp_path), max_source_mb="50")
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    async with running_app(settings) as client:
        response = await client.get("/r/huge-360.jpg")

    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert response.status_code == 413
    assert peak_after - peak_before < 512 * 1024  # ru_maxrss is in KiB on Linux


async def test_405_plain_text_no_store(s3_settings):
    async with running_app(s3_settings) as client:
        response = await client.post("/r/a/b/photo-720.jpg", content=b"x")

    assert response.status_code == 405
    assert response.headers["content-type"].startswith("text/plain")
    assert response.headers["cache-control"] == "no-store"
    assert "GET or HEAD" in response.text


async def test_405_names_the_route_methods(s3_settings):
    async with running_app(s3_settings) as client:
        response = await client.put("/events/s3", content=b"{}")

    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.text == "method not allowed; use POST\n"


@pytest.mark.parametrize("path", ["/r/a/b%0a-720.jpg", "/r/a/b%0d%0a-720.jpg", "/r/%0a/x-720.jpg"])
async def test_newline_in_path_returns_400(s3_settings, path):
    # A newline keeps the catch-all route from matching; it must still be a 400.
    counting = CountingStore(await open_store(s3_settings))

    async with running_app(s3_settings, counting) as client:
        response = await client.get(path)

    assert response.status_code == 400
    assert "control character" in response.text
    assert counting.calls == []


async def test_if_modified_since_returns_304(s3, bucket, photo, s3_settings):
    s3.put_object(Bucket=bucket, Key="original/p.jpg", Body=photo)

    async with running_app(s3_settings) as client:
        first = await client.get("/r/p-360.jpg")
        last_modified = first.headers["last-modified"]
        same = await client.get("/r/p-360.jpg", headers={"If-Modified-Since": last_modified})
        older = await client.get("/r/p-360.jpg", headers={"If-Modified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"})
        invalid = await client.get("/r/p-360.jpg", headers={"If-Modified-Since": "yesterday"})
        etag_wins = await client.get(
            "/r/p-360.jpg", headers={"If-Modified-Since": last_modified, "If-None-Match": '"other"'}
        )

    assert same.status_code == 304
    assert same.headers["last-modified"] == last_modified
    assert older.status_code == 200
    assert invalid.status_code == 200
    assert etag_wins.status_code == 200


async def test_root_path_returns_404(s3_settings):
    async with running_app(s3_settings) as client:
        response = await client.get("/")

    assert response.status_code == 404
    assert "/r/" in response.text


async def test_request_id_with_spaces_replaced(s3_settings, caplog):
    caplog.set_level("INFO", logger="proxy")

    async with running_app(s3_settings) as client:
        response = await client.get("/healthz", headers={"X-Request-ID": "abc status=200 injected"})

    assert response.headers["x-request-id"] != "abc status=200 injected"
    assert "injected" not in caplog.text


async def test_overlong_file_name_local_returns_400(tmp_path, settings_for):
    (tmp_path / "original").mkdir()
    settings = settings_for(storage=str(tmp_path))

    async with running_app(settings) as client:
        response = await client.get("/r/" + "a" * 300 + "-720.jpg")

    assert response.status_code == 400
    assert str(tmp_path) not in response.text


async def test_source_read_without_etag(s3, bucket, photo, s3_settings):
    s3.put_object(Bucket=bucket, Key="original/a/b/photo.jpg", Body=photo)
    requested = []

    class RecordingStore(CountingStore):
        async def get(self, key, max_bytes=None, *, need_etag=True):
            requested.append((key, need_etag))
            return await super().get(key, max_bytes, need_etag=need_etag)

    store = RecordingStore(await open_store(s3_settings))
    async with running_app(s3_settings, store) as client:
        response = await client.get("/r/a/b/photo-720.jpg")

    assert response.status_code == 200
    # The response sends the stored variant's ETag. The source is only resized,
    # so the local store need not hash it.
    assert ("r/a/b/photo-720.jpg", True) in requested
    assert ("original/a/b/photo.jpg", False) in requested


async def test_parsed_paths_emptied_when_full(s3_settings, monkeypatch):
    monkeypatch.setattr(variants_module, "PARSED_PATHS", 2)
    service = VariantService(await open_store(s3_settings), s3_settings)
    try:
        keys = [service.parse(f"/r/photo{number}-720.jpg".encode()).key for number in range(5)]
        remembered = len(service.parsed_paths)
    finally:
        service.close()
        await service.store.close()

    assert keys == [f"r/photo{number}-720.jpg" for number in range(5)]
    assert remembered == 1
