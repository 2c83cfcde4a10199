"""UploadHandler against moto's S3 server over HTTP, with real libvips and photos."""

import asyncio
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import boto3
import pytest
from conftest import CountingStore, decode, make_image
from event_documents import AWKWARD_KEYS, ENVELOPES, s3_notification, s3_record

from proxy import imaging
from proxy.errors import NotFound, StoreFailed
from proxy.store import open_store
from proxy.uploads import DELETED, FAILED, MADE, SKIPPED, UploadHandler, open_upload_handler, source_of
from proxy.variants import Variant, VariantService

WIDTHS = [360, 720, 1200, 2200]
FORMATS = ["jpg", "webp"]
CONTENT_TYPES = {"jpg": "image/jpeg", "webp": "image/webp"}


@pytest.fixture
def s3_settings(bucket, settings_for):
    return settings_for(storage=f"s3://{bucket}")


@pytest.fixture
async def counting_store(s3_settings):
    store = CountingStore(await open_store(s3_settings))
    yield store
    await store.close()


@pytest.fixture
def executor():
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="test-resize")
    yield pool
    pool.shutdown(wait=True)


@pytest.fixture
def uploads(counting_store, s3_settings, executor):
    return UploadHandler(counting_store, s3_settings, executor)


def variant_keys(s3, bucket: str) -> list[str]:
    """Every key under the variant prefix. Test buckets stay far below one page."""
    listing = s3.list_objects_v2(Bucket=bucket, Prefix="r/")
    return sorted(item["Key"] for item in listing.get("Contents", []))


def expected_keys(stem_path: str) -> list[str]:
    return sorted(f"r/{stem_path}-{width}.{fmt}" for width in WIDTHS for fmt in FORMATS)


def event(bucket: str, key: str, event_name: str = "ObjectCreated:Put") -> str:
    return json.dumps(s3_notification(s3_record(bucket, key, event_name)))


def read(s3, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def small_jpeg() -> bytes:
    return make_image(80, 60)


async def make_photo_variants(s3, bucket, photo, uploads) -> list:
    s3.put_object(Bucket=bucket, Key="original/trips/photo.jpg", Body=photo, ContentType="image/jpeg")
    return await uploads.handle_document(event(bucket, "original/trips/photo.jpg"))


async def test_created_photo_makes_eight_variants(s3, bucket, photo, uploads, counting_store):
    outcomes = await make_photo_variants(s3, bucket, photo, uploads)

    assert [outcome.result for outcome in outcomes] == [MADE]
    assert outcomes[0].key == "original/trips/photo.jpg"
    assert outcomes[0].variants == 8
    assert variant_keys(s3, bucket) == expected_keys("trips/photo")
    assert counting_store.count("get", "original/trips/photo.jpg") == 1
    assert counting_store.count("put") == 8
    assert counting_store.count("delete") == 0


async def test_created_photo_variant_sizes(s3, bucket, photo, uploads):
    source = decode(photo)

    await make_photo_variants(s3, bucket, photo, uploads)

    for width in WIDTHS:
        expected_width = min(width, source.width)
        expected_height = round(source.height * expected_width / source.width)
        for fmt in FORMATS:
            image = decode(read(s3, bucket, f"r/trips/photo-{width}.{fmt}"))
            assert image.width == expected_width, f"width of {width}.{fmt}"
            assert image.height == expected_height, f"height of {width}.{fmt}"


async def test_created_photo_variant_formats(s3, bucket, photo, uploads):
    await make_photo_variants(s3, bucket, photo, uploads)

    for width in WIDTHS:
        for fmt in FORMATS:
            stored = s3.get_object(Bucket=bucket, Key=f"r/trips/photo-{width}.{fmt}")
            loader = decode(stored["Body"].read()).get("vips-loader")
            assert stored["ContentType"] == CONTENT_TYPES[fmt], f"content type of {width}.{fmt}"
            assert loader == {"jpg": "jpegload_buffer", "webp": "webpload_buffer"}[fmt], f"loader of {width}.{fmt}"
            assert stored["CacheControl"] == "public, max-age=31536000, immutable", f"cache of {width}.{fmt}"


async def test_created_photo_variants_lack_exif(s3, bucket, photo, uploads):
    assert decode(photo).get_typeof("exif-data") != 0, "the test photo must carry EXIF"

    await make_photo_variants(s3, bucket, photo, uploads)

    for key in expected_keys("trips/photo"):
        body = read(s3, bucket, key)
        fields = decode(body).get_fields()
        assert [name for name in fields if name.startswith(("exif-", "xmp-", "iptc-"))] == [], key
        assert b"TestCamera" not in body, key


async def test_upload_encodes_run_in_parallel(s3, bucket, photo, uploads, monkeypatch):
    running = []
    running_counts = []
    lock = threading.Lock()
    encode = imaging.encode_variant

    def tracked(*args):
        with lock:
            running.append(1)
            running_counts.append(len(running))
        # Long enough that the two resize threads of the fixture overlap.
        time.sleep(0.05)
        try:
            return encode(*args)
        finally:
            with lock:
                running.pop()

    monkeypatch.setattr(imaging, "encode_variant", tracked)

    outcomes = await make_photo_variants(s3, bucket, photo, uploads)

    assert [outcome.result for outcome in outcomes] == [MADE]
    assert len(running_counts) == 8
    assert max(running_counts) == 2
    assert variant_keys(s3, bucket) == expected_keys("trips/photo")


async def test_failed_encode_keeps_previous_variants(s3, bucket, photo, uploads, counting_store, monkeypatch):
    await make_photo_variants(s3, bucket, photo, uploads)
    before = {key: read(s3, bucket, key) for key in expected_keys("trips/photo")}
    puts = counting_store.count("put")
    encode = imaging.encode_variant

    def failing_encode(decoded, width, output_format, settings):
        if (width, output_format) == (360, "jpg"):
            raise imaging.UndecodableSource("encoder failed")
        return encode(decoded, width, output_format, settings)

    monkeypatch.setattr(imaging, "encode_variant", failing_encode)
    replacement = make_image(1600, 1000)
    s3.put_object(Bucket=bucket, Key="original/trips/photo.jpg", Body=replacement, ContentType="image/jpeg")
    outcomes = await uploads.handle_document(event(bucket, "original/trips/photo.jpg"))

    assert [outcome.result for outcome in outcomes] == [FAILED]
    assert outcomes[0].reason == "encoder failed"
    assert counting_store.count("put") == puts
    assert {key: read(s3, bucket, key) for key in expected_keys("trips/photo")} == before


async def test_same_event_twice_same_bytes(s3, bucket, photo, uploads):
    await make_photo_variants(s3, bucket, photo, uploads)
    first = {key: read(s3, bucket, key) for key in variant_keys(s3, bucket)}

    outcomes = await uploads.handle_document(event(bucket, "original/trips/photo.jpg"))

    assert [outcome.result for outcome in outcomes] == [MADE]
    second = {key: read(s3, bucket, key) for key in variant_keys(s3, bucket)}
    assert sorted(second) == sorted(first)
    for key, body in first.items():
        assert second[key] == body, key


async def test_multipart_events_twice_harmless(s3, bucket, uploads):
    key = "original/big/scan.png"
    upload = s3.create_multipart_upload(Bucket=bucket, Key=key, ContentType="image/png")
    part = s3.upload_part(
        Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=make_image(300, 200, ".png")
    )
    s3.complete_multipart_upload(
        Bucket=bucket,
        Key=key,
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]},
    )
    record = s3_record(bucket, key, "ObjectCreated:CompleteMultipartUpload")

    outcomes = await uploads.handle_document(json.dumps(s3_notification(record, record)))

    assert [outcome.result for outcome in outcomes] == [MADE, MADE]
    assert variant_keys(s3, bucket) == expected_keys("big/scan")
    assert decode(read(s3, bucket, "r/big/scan-360.webp")).width == 300


async def test_delete_removes_only_own_variants(s3, bucket, uploads):
    # `img-800`, `img-a`, `img2` and the folder `img/` all share the prefix `r/img`.
    sources = ["img", "img-800", "img-a", "img2", "img/inner", "other"]
    for stem in sources:
        s3.put_object(Bucket=bucket, Key=f"original/{stem}.jpg", Body=small_jpeg())
        outcomes = await uploads.handle_document(event(bucket, f"original/{stem}.jpg"))
        assert [outcome.result for outcome in outcomes] == [MADE], stem
    s3.delete_object(Bucket=bucket, Key="original/img.jpg")

    outcomes = await uploads.handle_document(event(bucket, "original/img.jpg", "ObjectRemoved:Delete"))

    assert [outcome.result for outcome in outcomes] == [DELETED]
    assert outcomes[0].variants == 8
    remaining = sorted(key for stem in sources if stem != "img" for key in expected_keys(stem))
    assert variant_keys(s3, bucket) == remaining


async def test_delete_marker_removes_variants(s3, bucket, uploads):
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    s3.put_object(Bucket=bucket, Key="original/a.jpg", Body=small_jpeg())
    await uploads.handle_document(event(bucket, "original/a.jpg"))
    deleted = s3.delete_object(Bucket=bucket, Key="original/a.jpg")
    assert deleted.get("DeleteMarker") is True, "a versioned bucket must create a delete marker"

    outcomes = await uploads.handle_document(event(bucket, "original/a.jpg", "ObjectRemoved:DeleteMarkerCreated"))

    assert [outcome.result for outcome in outcomes] == [DELETED]
    assert variant_keys(s3, bucket) == []


async def test_delete_without_variants_succeeds(s3, bucket, uploads):
    outcomes = await uploads.handle_document(event(bucket, "original/never.jpg", "ObjectRemoved:Delete"))

    assert [outcome.result for outcome in outcomes] == [DELETED]
    assert outcomes[0].variants == 0


@pytest.mark.parametrize(
    ("key", "event_name", "other_bucket", "expected_reason"),
    [
        pytest.param("r/photo-360.jpg", "ObjectCreated:Put", False, "variant prefix", id="variant-prefix"),
        pytest.param("uploads/photo.jpg", "ObjectCreated:Put", False, "outside the source prefix", id="outside"),
        pytest.param("original/notes.txt", "ObjectCreated:Put", False, "not a supported image", id="txt"),
        pytest.param("original/photo", "ObjectCreated:Put", False, "not a supported image", id="no-extension"),
        pytest.param("original/a/../photo.jpg", "ObjectCreated:Put", False, "'..' segment", id="dot-dot"),
        pytest.param("original/photo.jpg", "ObjectCreated:Put", True, "not the configured bucket", id="other-bucket"),
        pytest.param("original/photo.jpg", "ObjectRestore:Completed", False, "changes no image", id="restore"),
        pytest.param("original/photo.jpg", "ObjectRemoved:Delete", True, "not the configured bucket", id="other-delete"),
    ],
)
async def test_skipped_event_writes_nothing(
    s3, bucket, uploads, counting_store, key, event_name, other_bucket, expected_reason
):
    # The object exists in the configured bucket, so only the skip rule stops the work.
    s3.put_object(Bucket=bucket, Key=key, Body=small_jpeg())
    s3.put_object(Bucket=bucket, Key="r/photo-360.webp", Body=b"kept")
    before = variant_keys(s3, bucket)
    event_bucket = "another-bucket" if other_bucket else bucket

    outcomes = await uploads.handle_document(event(event_bucket, key, event_name))

    assert [outcome.result for outcome in outcomes] == [SKIPPED]
    assert outcomes[0].key == key
    assert expected_reason in outcomes[0].reason
    assert counting_store.count("put") == 0
    assert counting_store.count("delete") == 0
    assert variant_keys(s3, bucket) == before


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"this is a text file, not a JPEG", id="text"),
        pytest.param(b"", id="empty"),
        pytest.param(make_image(400, 300)[:1500], id="truncated-jpeg"),
    ],
)
async def test_undecodable_upload_fails_then_recovers(s3, bucket, uploads, counting_store, body):
    s3.put_object(Bucket=bucket, Key="original/broken.jpg", Body=body)
    s3.put_object(Bucket=bucket, Key="original/fine.jpg", Body=small_jpeg())

    outcomes = await uploads.handle_document(event(bucket, "original/broken.jpg"))

    assert [outcome.result for outcome in outcomes] == [FAILED]
    assert outcomes[0].key == "original/broken.jpg"
    assert outcomes[0].reason != ""
    assert counting_store.count("put") == 0
    assert counting_store.count("delete") == 0
    assert variant_keys(s3, bucket) == []

    outcomes = await uploads.handle_document(event(bucket, "original/fine.jpg"))

    assert [outcome.result for outcome in outcomes] == [MADE]
    assert variant_keys(s3, bucket) == expected_keys("fine")


async def test_failed_record_leaves_others_handled(s3, bucket, uploads):
    s3.put_object(Bucket=bucket, Key="original/broken.jpg", Body=b"not an image")
    s3.put_object(Bucket=bucket, Key="original/fine.jpg", Body=small_jpeg())
    document = s3_notification(
        s3_record(bucket, "original/broken.jpg"),
        s3_record(bucket, "original/fine.jpg"),
        s3_record(bucket, "original/notes.txt"),
    )

    outcomes = await uploads.handle_document(json.dumps(document))

    assert [outcome.result for outcome in outcomes] == [FAILED, MADE, SKIPPED]
    assert variant_keys(s3, bucket) == expected_keys("fine")


@pytest.mark.parametrize(
    ("limit", "expected_reason"),
    [
        pytest.param({"max_source_mb": "0.01"}, "PROXY_MAX_SOURCE_MB", id="bytes"),
        pytest.param({"max_pixels": "10000"}, "PROXY_MAX_PIXELS", id="pixels"),
    ],
)
async def test_oversized_source_fails_without_writes(
    s3, bucket, photo, settings_for, executor, limit, expected_reason
):
    settings = settings_for(storage=f"s3://{bucket}", **limit)
    s3.put_object(Bucket=bucket, Key="original/photo.jpg", Body=photo)
    store = CountingStore(await open_store(settings))
    handler = UploadHandler(store, settings, executor)
    try:
        outcomes = await handler.handle_document(event(bucket, "original/photo.jpg"))
    finally:
        await store.close()

    assert [outcome.result for outcome in outcomes] == [FAILED]
    assert expected_reason in outcomes[0].reason
    assert store.count("put") == 0
    assert variant_keys(s3, bucket) == []


async def test_undecodable_upload_logs_warning(s3, bucket, uploads, caplog):
    s3.put_object(Bucket=bucket, Key="original/broken.jpg", Body=b"not an image")

    await uploads.handle_document(event(bucket, "original/broken.jpg"))

    warnings = [
        record.getMessage()
        for record in caplog.records
        if record.name == "proxy.uploads" and record.levelno == logging.WARNING
    ]
    assert len(warnings) == 1
    assert "result=failed" in warnings[0]
    assert "original/broken.jpg" in warnings[0]


async def test_gone_source_is_skipped(bucket, uploads, counting_store):
    outcomes = await uploads.handle_document(event(bucket, "original/gone.jpg"))

    assert [outcome.result for outcome in outcomes] == [SKIPPED]
    assert "no longer exists" in outcomes[0].reason
    assert counting_store.count("put") == 0


async def test_narrow_source_keeps_its_width(s3, bucket, uploads):
    s3.put_object(Bucket=bucket, Key="original/narrow.png", Body=make_image(500, 250, ".png"))

    outcomes = await uploads.handle_document(event(bucket, "original/narrow.png"))

    assert [outcome.result for outcome in outcomes] == [MADE]
    assert variant_keys(s3, bucket) == expected_keys("narrow")
    for width in WIDTHS:
        for fmt in FORMATS:
            image = decode(read(s3, bucket, f"r/narrow-{width}.{fmt}"))
            assert image.width == min(width, 500), f"width of {width}.{fmt}"
            assert image.height == min(width, 500) // 2, f"height of {width}.{fmt}"


@pytest.mark.parametrize("envelope", sorted(ENVELOPES))
@pytest.mark.parametrize("relative_key", AWKWARD_KEYS)
async def test_awkward_key_makes_and_deletes(s3, bucket, uploads, envelope, relative_key):
    key = f"original/{relative_key}"
    stem_path = relative_key.rsplit(".", 1)[0]
    s3.put_object(Bucket=bucket, Key=key, Body=small_jpeg())

    create_outcomes = await uploads.handle_document(ENVELOPES[envelope](bucket, key, "created"))

    assert [(outcome.key, outcome.result) for outcome in create_outcomes] == [(key, MADE)]
    assert variant_keys(s3, bucket) == expected_keys(stem_path)

    s3.delete_object(Bucket=bucket, Key=key)
    delete_outcomes = await uploads.handle_document(ENVELOPES[envelope](bucket, key, "removed"))

    assert [(outcome.key, outcome.result) for outcome in delete_outcomes] == [(key, DELETED)]
    assert variant_keys(s3, bucket) == []


def aws_client(service: str, endpoint: str):
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture
def notification_queue(aws_env, s3, bucket, request):
    """Route the bucket's S3 notifications to a new SQS queue inside moto.

    The parameter picks the route: "sqs" (S3 to SQS), "sns" (S3 to SNS to SQS) or
    "eventbridge" (S3 to EventBridge to SQS). Yields the queue URL.
    """
    route = request.param
    sqs = aws_client("sqs", aws_env)
    name = f"uploads-{uuid.uuid4().hex[:16]}"
    queue_url = sqs.create_queue(QueueName=name)["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    events_to = ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]
    cleanup = []

    if route == "sqs":
        configuration = {"QueueConfigurations": [{"QueueArn": queue_arn, "Events": events_to}]}
    elif route == "sns":
        sns = aws_client("sns", aws_env)
        topic_arn = sns.create_topic(Name=name)["TopicArn"]
        sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=queue_arn)
        cleanup.append(lambda: sns.delete_topic(TopicArn=topic_arn))
        configuration = {"TopicConfigurations": [{"TopicArn": topic_arn, "Events": events_to}]}
    else:
        events = aws_client("events", aws_env)
        # moto sends every bucket's events to every rule, so the rule picks this bucket.
        pattern = {"source": ["aws.s3"], "detail": {"bucket": {"name": [bucket]}}}
        events.put_rule(Name=name, EventPattern=json.dumps(pattern))
        events.put_targets(Rule=name, Targets=[{"Id": "queue", "Arn": queue_arn}])
        cleanup.append(lambda: events.remove_targets(Rule=name, Ids=["queue"]))
        cleanup.append(lambda: events.delete_rule(Name=name))
        configuration = {"EventBridgeConfiguration": {}}
    s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration=configuration)

    yield queue_url

    for step in cleanup:
        step()
    sqs.delete_queue(QueueUrl=queue_url)


def drain(sqs, queue_url: str) -> list[str]:
    """Receive and delete every message body in the queue.

    moto queues a notification before the S3 call that caused it returns, so an
    empty receive means the queue is drained.
    """
    bodies: list[str] = []
    for _ in range(50):
        messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages", [])
        if not messages:
            return bodies
        for message in messages:
            bodies.append(message["Body"])
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
    raise AssertionError(f"queue still had messages after {len(bodies)} were received")


async def handle_bodies(uploads, bodies: list[str]) -> dict[str, set[str]]:
    """Handle each message body and return the keys per result."""
    results: dict[str, set[str]] = {MADE: set(), DELETED: set(), SKIPPED: set(), FAILED: set()}
    for body in bodies:
        for outcome in await uploads.handle_document(body):
            results[outcome.result].add(outcome.key)
    return results


@pytest.mark.parametrize("notification_queue", ["sqs", "sns", "eventbridge"], indirect=True)
async def test_moto_notifications_make_awkward_keys(aws_env, s3, bucket, uploads, notification_queue):
    sqs = aws_client("sqs", aws_env)
    keys = [f"original/{relative_key}" for relative_key in AWKWARD_KEYS]
    drain(sqs, notification_queue)  # s3:TestEvent from the configuration
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=small_jpeg())

    create_results = await handle_bodies(uploads, drain(sqs, notification_queue))

    assert create_results[MADE] == set(keys)
    assert create_results[FAILED] == set()
    expected = sorted(key for relative_key in AWKWARD_KEYS for key in expected_keys(relative_key.rsplit(".", 1)[0]))
    assert variant_keys(s3, bucket) == expected

    for key in keys:
        s3.delete_object(Bucket=bucket, Key=key)

    delete_results = await handle_bodies(uploads, drain(sqs, notification_queue))

    assert delete_results[DELETED] == set(keys)
    assert delete_results[FAILED] == set()
    assert variant_keys(s3, bucket) == []


async def test_open_upload_handler_makes_variants(s3, bucket, s3_settings):
    s3.put_object(Bucket=bucket, Key="original/a.jpg", Body=small_jpeg())

    async with open_upload_handler(s3_settings) as handler:
        outcomes = await handler.handle_document(event(bucket, "original/a.jpg"))

    assert [outcome.result for outcome in outcomes] == [MADE]
    assert variant_keys(s3, bucket) == expected_keys("a")


def fake_variant(key: str) -> Variant:
    return Variant(key, b"stale", "image/jpeg", '"stale"', datetime(2020, 1, 1, tzinfo=timezone.utc), "generated")


async def test_reupload_drops_stale_memory_entries(s3, bucket, s3_settings, counting_store, executor):
    service = VariantService(counting_store, s3_settings)
    uploads = UploadHandler(counting_store, s3_settings, executor, variants=service)
    stale_keys = ["r/photo-720.jpg", "r/photo-2200.webp", "r/photo-720.avif", "r/photo-720.jpeg"]
    for key in [*stale_keys, "r/photo-800-720.jpg", "r/other-720.jpg"]:
        service.memory[key] = fake_variant(key)
    service.source_keys["original/photo"] = "original/photo.png"
    # The HTTP path stored these copies of the earlier upload.
    s3.put_object(Bucket=bucket, Key="r/photo-720.avif", Body=b"stale")
    s3.put_object(Bucket=bucket, Key="r/photo-720.jpeg", Body=b"stale")
    s3.put_object(Bucket=bucket, Key="original/photo.jpg", Body=small_jpeg())

    try:
        outcomes = await uploads.handle_document(event(bucket, "original/photo.jpg"))
    finally:
        service.close()

    assert [outcome.result for outcome in outcomes] == [MADE]
    for key in stale_keys:
        assert key not in service.memory, key
    assert "r/photo-800-720.jpg" in service.memory
    assert "r/other-720.jpg" in service.memory
    assert "original/photo" not in service.source_keys


RED, GREEN, BLUE = [200, 30, 30], [30, 200, 30], [30, 30, 200]


def colour_of(body: bytes) -> str:
    """Name the strongest channel of an image's top-left area: red, green or blue."""
    pixel = decode(body)(10, 10)
    return ("red", "green", "blue")[max(range(3), key=lambda band: pixel[band])]


@pytest.fixture
def shared_service(counting_store, s3_settings, executor):
    """A VariantService and an UploadHandler that updates it, as `serve` pairs them."""
    service = VariantService(counting_store, s3_settings)
    yield service, UploadHandler(counting_store, s3_settings, executor, variants=service)
    service.close()


def hold_first_call(method, matches):
    """Wrap an async store method so that its first matching call, once done,
    returns only after `release` is set. Returns the wrapper, `reached` and `release`."""
    reached, release = asyncio.Event(), asyncio.Event()

    async def held(*args, **options):
        result = await method(*args, **options)
        if matches(*args) and not reached.is_set():
            reached.set()
            await release.wait()
        return result

    return held, reached, release


async def test_generation_during_event_not_stored(s3, bucket, shared_service, monkeypatch):
    service, uploads = shared_service
    s3.put_object(Bucket=bucket, Key="original/pic.jpg", Body=solid(RED, ".jpg"))
    started, release = threading.Event(), threading.Event()
    make_variant = imaging.make_variant

    def held_make_variant(*args):
        # The request has read the red source; it finishes after the event.
        started.set()
        release.wait(timeout=10)
        return make_variant(*args)

    monkeypatch.setattr(imaging, "make_variant", held_make_variant)
    try:
        request = asyncio.ensure_future(service.get(service.parse(b"/r/pic-360.jpg")))
        assert await asyncio.to_thread(started.wait, 10)
        s3.put_object(Bucket=bucket, Key="original/pic.jpg", Body=solid(BLUE, ".jpg"))
        outcomes = await uploads.handle_document(event(bucket, "original/pic.jpg"))
        later = await service.get(service.parse(b"/r/pic-360.jpg"))
    finally:
        release.set()
    served = await request

    assert [outcome.result for outcome in outcomes] == [MADE]
    # The request gets the image of the source it read. The store, the memory
    # cache and a request after the event get the event's.
    assert colour_of(served.body) == "red"
    assert colour_of(later.body) == "blue"
    assert colour_of(read(s3, bucket, "r/pic-360.jpg")) == "blue"
    assert colour_of(service.memory["r/pic-360.jpg"].body) == "blue"


async def test_store_read_during_event_not_cached(s3, bucket, shared_service, counting_store):
    service, uploads = shared_service
    s3.put_object(Bucket=bucket, Key="original/pic.jpg", Body=solid(RED, ".jpg"))
    await uploads.handle_document(event(bucket, "original/pic.jpg"))
    # The read finds the red variant, and returns after the event has ended.
    counting_store.get, read_started, release = hold_first_call(
        counting_store.get, lambda key, *args: key == "r/pic-360.jpg"
    )
    try:
        request = asyncio.ensure_future(service.get(service.parse(b"/r/pic-360.jpg")))
        await asyncio.wait_for(read_started.wait(), 10)
        s3.put_object(Bucket=bucket, Key="original/pic.jpg", Body=solid(BLUE, ".jpg"))
        outcomes = await uploads.handle_document(event(bucket, "original/pic.jpg"))
    finally:
        release.set()
    served = await request
    later = await service.get(service.parse(b"/r/pic-360.jpg"))

    assert [outcome.result for outcome in outcomes] == [MADE]
    assert colour_of(served.body) == "red"
    assert colour_of(later.body) == "blue"


async def test_failed_write_drops_memory_entries(s3, bucket, photo, shared_service, counting_store):
    service, uploads = shared_service
    keys = expected_keys("trips/photo")
    for key in keys:
        service.memory[key] = fake_variant(key)
    put = counting_store.put

    async def failing_put(key, *args):
        if key == "r/trips/photo-360.webp":
            raise StoreFailed("simulated write failure")
        return await put(key, *args)

    counting_store.put = failing_put
    outcomes = await make_photo_variants(s3, bucket, photo, uploads)

    assert [outcome.result for outcome in outcomes] == [FAILED]
    assert outcomes[0].reason == "simulated write failure"
    assert "r/trips/photo-360.webp" not in variant_keys(s3, bucket)
    assert [key for key in keys if key in service.memory] == []


async def test_sibling_upload_replaces_own_formats(s3, bucket, shared_service):
    service, uploads = shared_service
    s3.put_object(Bucket=bucket, Key="original/s/photo.jpg", Body=solid(RED, ".jpg"))
    s3.put_object(Bucket=bucket, Key="original/s/photo.png", Body=solid(BLUE, ".png"))
    await uploads.handle_document(event(bucket, "original/s/photo.jpg"))
    first = await service.get(service.parse(b"/r/s/photo-720.png"))

    s3.put_object(Bucket=bucket, Key="original/s/photo.png", Body=solid(GREEN, ".png"))
    outcomes = await uploads.handle_document(event(bucket, "original/s/photo.png"))
    after = await service.get(service.parse(b"/r/s/photo-720.png"))

    # The jpg and webp variants come from photo.jpg, the png ones from photo.png.
    assert [outcome.result for outcome in outcomes] == [SKIPPED]
    assert colour_of(first.body) == "blue"
    assert colour_of(after.body) == "green"
    assert colour_of(read(s3, bucket, "r/s/photo-720.png")) == "green"


async def test_delete_during_write_leaves_no_variant(s3, bucket, shared_service, counting_store):
    service, uploads = shared_service
    s3.put_object(Bucket=bucket, Key="original/d/photo.jpg", Body=solid(RED, ".jpg"))
    put = counting_store.put

    async def put_then_delete_source(key, *args):
        stored = await put(key, *args)
        if key == "r/d/photo-720.jpg":
            # The source is deleted, and its event handled, as the write ends.
            s3.delete_object(Bucket=bucket, Key="original/d/photo.jpg")
            await uploads.handle_document(event(bucket, "original/d/photo.jpg", "ObjectRemoved:Delete"))
        return stored

    counting_store.put = put_then_delete_source
    served = await service.get(service.parse(b"/r/d/photo-720.jpg"))
    with pytest.raises(NotFound):
        await service.get(service.parse(b"/r/d/photo-720.jpg"))

    assert colour_of(served.body) == "red"
    assert variant_keys(s3, bucket) == []


async def test_listing_during_event_not_kept(s3, bucket, shared_service, counting_store):
    service, uploads = shared_service
    s3.put_object(Bucket=bucket, Key="original/w/photo.png", Body=solid(BLUE, ".png"))
    # The listing finds only photo.png, and returns after photo.jpg's event.
    counting_store.list_keys, listed, release = hold_first_call(
        counting_store.list_keys, lambda prefix: prefix == "original/w/photo."
    )
    try:
        request = asyncio.ensure_future(service.get(service.parse(b"/r/w/photo-720.jpeg")))
        await asyncio.wait_for(listed.wait(), 10)
        s3.put_object(Bucket=bucket, Key="original/w/photo.jpg", Body=solid(GREEN, ".jpg"))
        await uploads.handle_document(event(bucket, "original/w/photo.jpg"))
    finally:
        release.set()
    await request
    later = await service.get(service.parse(b"/r/w/photo-720.jpeg"))

    # A `.jpeg` variant comes from photo.jpg once it exists.
    assert colour_of(later.body) == "green"


async def test_reupload_deletes_other_stored_formats(s3, bucket, uploads):
    s3.put_object(Bucket=bucket, Key="original/photo.jpg", Body=small_jpeg())
    # Copies that the HTTP path made from an earlier upload, and another source's.
    for key in ["r/photo-720.avif", "r/photo-720.png", "r/photo-720.jpeg", "r/photo-640.jpg", "r/photo-800-720.avif"]:
        s3.put_object(Bucket=bucket, Key=key, Body=b"stale")

    outcomes = await uploads.handle_document(event(bucket, "original/photo.jpg"))

    assert [outcome.result for outcome in outcomes] == [MADE]
    assert variant_keys(s3, bucket) == sorted([*expected_keys("photo"), "r/photo-800-720.avif"])


async def test_make_of_some_sizes_keeps_others(s3, bucket, s3_settings, uploads):
    # backfill makes only the missing sizes, and must leave the others alone.
    s3.put_object(Bucket=bucket, Key="original/photo.jpg", Body=small_jpeg())
    s3.put_object(Bucket=bucket, Key="r/photo-720.avif", Body=b"made over HTTP")
    source = source_of("original/photo.jpg", s3_settings)

    outcome = await uploads.make(source, [(360, "jpg")])

    assert outcome.result == MADE
    assert outcome.variants == 1
    assert variant_keys(s3, bucket) == ["r/photo-360.jpg", "r/photo-720.avif"]


async def test_late_delete_keeps_reuploaded_variants(s3, bucket, uploads, counting_store):
    # The delete event of an earlier upload arrives after the new upload's event.
    s3.put_object(Bucket=bucket, Key="original/photo.jpg", Body=small_jpeg())
    await uploads.handle_document(event(bucket, "original/photo.jpg"))
    counting_store.calls.clear()

    outcomes = await uploads.handle_document(event(bucket, "original/photo.jpg", "ObjectRemoved:Delete"))

    assert [outcome.result for outcome in outcomes] == [SKIPPED]
    assert "exists again" in outcomes[0].reason
    assert counting_store.count("delete") == 0
    assert variant_keys(s3, bucket) == expected_keys("photo")


async def test_old_version_delete_keeps_variants(s3, bucket, uploads):
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    first = s3.put_object(Bucket=bucket, Key="original/photo.jpg", Body=make_image(90, 60))
    s3.put_object(Bucket=bucket, Key="original/photo.jpg", Body=small_jpeg())
    await uploads.handle_document(event(bucket, "original/photo.jpg"))
    s3.delete_object(Bucket=bucket, Key="original/photo.jpg", VersionId=first["VersionId"])

    outcomes = await uploads.handle_document(event(bucket, "original/photo.jpg", "ObjectRemoved:Delete"))

    assert [outcome.result for outcome in outcomes] == [SKIPPED]
    assert variant_keys(s3, bucket) == expected_keys("photo")


def solid(colour: list[int], suffix: str) -> bytes:
    return decode(make_image(400, 200)).new_from_image(colour).write_to_buffer(suffix)


async def test_png_upload_leaves_jpeg_sibling_variants(s3, bucket, uploads):
    # photo.jpg and photo.png share r/photo-*. The HTTP path makes jpg and webp
    # variants from photo.jpg, so an upload of photo.png must not overwrite them.
    s3.put_object(Bucket=bucket, Key="original/photo.jpg", Body=solid([255, 0, 0], ".jpg"))
    await uploads.handle_document(event(bucket, "original/photo.jpg"))
    s3.put_object(Bucket=bucket, Key="original/photo.png", Body=solid([0, 0, 255], ".png"))

    outcomes = await uploads.handle_document(event(bucket, "original/photo.png"))

    assert outcomes[0].result == SKIPPED
    assert "original/photo.jpg" in outcomes[0].reason
    red = decode(read(s3, bucket, "r/photo-360.webp")).extract_band(0).avg()
    assert red > 230


async def test_jpeg_upload_replaces_png_sibling_variants(s3, bucket, uploads):
    s3.put_object(Bucket=bucket, Key="original/photo.png", Body=solid([0, 0, 255], ".png"))
    await uploads.handle_document(event(bucket, "original/photo.png"))
    s3.put_object(Bucket=bucket, Key="original/photo.jpg", Body=solid([255, 0, 0], ".jpg"))

    outcomes = await uploads.handle_document(event(bucket, "original/photo.jpg"))

    assert outcomes[0].result == MADE
    assert outcomes[0].variants == 8
    red = decode(read(s3, bucket, "r/photo-360.webp")).extract_band(0).avg()
    assert red > 230


@pytest.mark.parametrize("key", ["original/a\nb.jpg", "original/tab\there.jpg", "original/x\x7f.jpg"])
def test_control_character_key_not_a_source(s3_settings, key):
    # Variant URLs with control characters get 400, so such variants could never be served.
    reason = source_of(key, s3_settings)

    assert reason == "key contains a control character"
