"""The SQS worker with real S3 → SQS notifications: moto's S3 sends, moto's SQS queues.

Each test gets its own bucket and queue, and the bucket's notification configuration
sends object events to that queue as S3 does. Most tests run SqsWorker in the test's
event loop; one runs `python -m proxy worker` as a subprocess and stops it with SIGTERM.
"""

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote_plus

import aioboto3
import boto3
import pytest
from conftest import FAKE_CREDENTIALS, REPO, CountingStore, GatedStore, decode, make_image

from proxy.errors import StoreFailed
from proxy.settings import Settings
from proxy.store import open_store
from proxy.uploads import UploadHandler, open_upload_handler
from proxy.worker import SqsWorker

WIDTHS = [360, 720, 1200, 2200]
FORMATS = ["jpg", "webp"]
LOADERS = {"jpg": "jpegload_buffer", "webp": "webpload_buffer"}
PHOTO_KEY = "original/trips/my trip/Été 01.jpg"
PHOTO_VARIANT_BASE = "r/trips/my trip/Été 01"

# Long-poll wait of each receive, in seconds.
WAIT_SECONDS = 1
# Visibility timeout, in seconds, of queues whose failed messages must come back
# soon. A good upload's message must stay hidden while it is handled, and handling
# the 2560-pixel test photo took up to 1.2 s with two tests at once on 2 cores.
SHORT_VISIBILITY_TIMEOUT = 3
# Upper bound of every wait for the worker's effects, in seconds.
POLL_TIMEOUT = 60.0
POLL_INTERVAL = 0.2
# Upper bound for the worker to finish its messages in flight and return.
STOP_TIMEOUT = 30.0


@dataclass(frozen=True)
class Queue:
    url: str
    arn: str
    # URL of the dead-letter queue named in the redrive policy, if there is one.
    dead_letter_url: str | None = None


@dataclass(frozen=True)
class QueueCounts:
    visible: int
    not_visible: int


@dataclass
class RunningWorker:
    worker: SqsWorker
    task: asyncio.Task[None]


def variant_keys(base: str) -> list[str]:
    return [f"{base}-{width}.{fmt}" for width in WIDTHS for fmt in FORMATS]


def sqs_client(endpoint: str):
    return boto3.client(
        "sqs",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture
def sqs(aws_env: str):
    return sqs_client(aws_env)


def queue_arn(sqs, url: str) -> str:
    return sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]


@pytest.fixture
def make_queue(sqs) -> Iterator[Callable[..., Queue]]:
    """Create queues with unique names, and delete them after the test."""
    created: list[str] = []

    def make(*, visibility_timeout: int = 30, max_receive_count: int | None = None) -> Queue:
        name = f"events-{uuid.uuid4().hex[:16]}"
        attributes = {"VisibilityTimeout": str(visibility_timeout)}
        dead_letter_url = None
        if max_receive_count is not None:
            dead_letter_url = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
            created.append(dead_letter_url)
            attributes["RedrivePolicy"] = json.dumps(
                {
                    "deadLetterTargetArn": queue_arn(sqs, dead_letter_url),
                    "maxReceiveCount": str(max_receive_count),
                }
            )
        url = sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
        created.append(url)
        return Queue(url=url, arn=queue_arn(sqs, url), dead_letter_url=dead_letter_url)

    yield make
    for url in created:
        sqs.delete_queue(QueueUrl=url)


def notify(s3, bucket: str, queue: Queue, prefix: str | None = None) -> None:
    """Send the bucket's object-created and object-removed events to `queue`.

    S3 (and moto) then sends an `s3:TestEvent` message to the queue.
    """
    configuration: dict = {
        "QueueArn": queue.arn,
        "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"],
    }
    if prefix is not None:
        configuration["Filter"] = {"Key": {"FilterRules": [{"Name": "prefix", "Value": prefix}]}}
    s3.put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={"QueueConfigurations": [configuration]},
    )


def queue_counts(sqs, url: str) -> QueueCounts:
    attributes = sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return QueueCounts(
        visible=int(attributes["ApproximateNumberOfMessages"]),
        not_visible=int(attributes["ApproximateNumberOfMessagesNotVisible"]),
    )


def all_keys(s3, bucket: str, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.update(item["Key"] for item in page.get("Contents", []))
    return keys


def has_keys(s3, bucket: str, keys: list[str]) -> Callable[[], bool]:
    return lambda: set(keys) <= all_keys(s3, bucket)


def expected_width(source: bytes, width: int) -> int:
    # A variant is never wider than its source.
    return min(width, decode(source).width)


async def wait_until(condition: Callable[[], bool], description: str, timeout: float = POLL_TIMEOUT) -> None:
    """Poll `condition` in a thread, so blocking boto3 calls leave the worker running."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await asyncio.to_thread(condition):
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {description}")
        await asyncio.sleep(POLL_INTERVAL)


def wait_until_sync(condition: Callable[[], bool], description: str, timeout: float = POLL_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {description}")
        time.sleep(POLL_INTERVAL)


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, queue_url: str) -> AsyncIterator[RunningWorker]:
    """Run SqsWorker in a task, then on exit stop it and wait for run() to return."""
    session = aioboto3.Session()
    async with open_upload_handler(settings) as handler, session.client("sqs") as client:
        worker = SqsWorker(handler, client, queue_url, concurrency=4, wait_seconds=WAIT_SECONDS)
        task = asyncio.create_task(worker.run())
        try:
            yield RunningWorker(worker, task)
        finally:
            worker.stop()
            await asyncio.wait_for(task, STOP_TIMEOUT)


def log_lines(caplog: pytest.LogCaptureFixture, logger: str, *fragments: str) -> list[str]:
    """Messages of `logger` that contain every fragment."""
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == logger and all(fragment in record.getMessage() for fragment in fragments)
    ]


def error_lines(caplog: pytest.LogCaptureFixture, logger: str, fragment: str) -> list[str]:
    """Messages of `logger` at ERROR or above that contain `fragment`."""
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == logger and record.levelno >= logging.ERROR and fragment in record.getMessage()
    ]


@pytest.fixture
def s3_settings(bucket: str, settings_for) -> Settings:
    return settings_for(storage=f"s3://{bucket}")


@pytest.fixture
def proxy_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="proxy")
    return caplog


async def test_worker_upload_makes_all_variants(s3, sqs, bucket, photo, s3_settings, make_queue):
    queue = make_queue()
    notify(s3, bucket, queue, prefix="original/")
    keys = variant_keys(PHOTO_VARIANT_BASE)

    async with running_worker(s3_settings, queue.url) as running:
        s3.put_object(Bucket=bucket, Key=PHOTO_KEY, Body=photo, ContentType="image/jpeg")
        await wait_until(has_keys(s3, bucket, keys), "the 8 variants of the photo")
        await wait_until(lambda: queue_counts(sqs, queue.url) == QueueCounts(0, 0), "an empty queue")
        assert not running.task.done()

    for width in WIDTHS:
        for fmt in FORMATS:
            key = f"{PHOTO_VARIANT_BASE}-{width}.{fmt}"
            image = decode(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
            assert image.width == expected_width(photo, width), key
            assert image.get("vips-loader") == LOADERS[fmt], key
    counts = queue_counts(sqs, queue.url)
    assert counts.visible == 0
    assert counts.not_visible == 0


async def test_worker_multipart_upload_makes_variants(s3, sqs, bucket, photo, s3_settings, make_queue):
    queue = make_queue()
    notify(s3, bucket, queue, prefix="original/")
    key = "original/big/multi part.jpg"

    async with running_worker(s3_settings, queue.url):
        upload = s3.create_multipart_upload(Bucket=bucket, Key=key, ContentType="image/jpeg")
        part = s3.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=photo)
        s3.complete_multipart_upload(
            Bucket=bucket,
            Key=key,
            UploadId=upload["UploadId"],
            MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]},
        )
        await wait_until(has_keys(s3, bucket, variant_keys("r/big/multi part")), "the variants")
        await wait_until(lambda: queue_counts(sqs, queue.url) == QueueCounts(0, 0), "an empty queue")

    image = decode(s3.get_object(Bucket=bucket, Key="r/big/multi part-720.webp")["Body"].read())
    assert image.width == expected_width(photo, 720)


async def test_worker_delete_removes_variants(s3, sqs, bucket, photo, s3_settings, make_queue):
    queue = make_queue()
    notify(s3, bucket, queue, prefix="original/")
    keys = variant_keys(PHOTO_VARIANT_BASE)
    # A variant of another source, whose name starts like the photo's variants.
    neighbour = "r/trips/my trip/Été 01-b-360.jpg"
    s3.put_object(Bucket=bucket, Key=neighbour, Body=make_image(360, 240))

    async with running_worker(s3_settings, queue.url):
        s3.put_object(Bucket=bucket, Key=PHOTO_KEY, Body=photo, ContentType="image/jpeg")
        await wait_until(has_keys(s3, bucket, keys), "the 8 variants of the photo")

        s3.delete_object(Bucket=bucket, Key=PHOTO_KEY)
        await wait_until(lambda: not set(keys) & all_keys(s3, bucket), "the variants to be deleted")
        await wait_until(lambda: queue_counts(sqs, queue.url) == QueueCounts(0, 0), "an empty queue")

    assert all_keys(s3, bucket, "r/") == {neighbour}


async def test_worker_variant_events_do_nothing(s3, sqs, bucket, photo, s3_settings, make_queue, proxy_logs):
    queue = make_queue()
    # No prefix filter: the worker's own variant uploads are queued too.
    notify(s3, bucket, queue)
    keys = variant_keys(PHOTO_VARIANT_BASE)

    async with running_worker(s3_settings, queue.url):
        s3.put_object(Bucket=bucket, Key=PHOTO_KEY, Body=photo, ContentType="image/jpeg")
        await wait_until(has_keys(s3, bucket, keys), "the 8 variants of the photo")
        # One message per variant upload follows the photo's; all must be handled.
        await wait_until(
            lambda: len(log_lines(proxy_logs, "proxy.uploads", "result=skipped", "under the variant prefix")) >= 8,
            "the 8 variant events",
        )
        await wait_until(lambda: queue_counts(sqs, queue.url) == QueueCounts(0, 0), "an empty queue")

    stored = all_keys(s3, bucket)
    assert stored == {PHOTO_KEY, *keys}
    assert not [key for key in stored if key.startswith("r/r/")]
    skipped = log_lines(proxy_logs, "proxy.uploads", "result=skipped", "under the variant prefix")
    assert len(skipped) == 8
    made_lines = log_lines(proxy_logs, "proxy.uploads", "result=made")
    assert len(made_lines) == 1


async def test_worker_bad_upload_goes_to_dlq(s3, sqs, bucket, s3_settings, make_queue, proxy_logs):
    queue = make_queue(visibility_timeout=SHORT_VISIBILITY_TIMEOUT, max_receive_count=2)
    notify(s3, bucket, queue, prefix="original/")
    good_keys = variant_keys("r/good")

    async with running_worker(s3_settings, queue.url) as running:
        s3.put_object(Bucket=bucket, Key="original/bad.jpg", Body=b"these bytes are no image at all")
        s3.put_object(Bucket=bucket, Key="original/good.jpg", Body=make_image(1000, 700))
        await wait_until(has_keys(s3, bucket, good_keys), "the variants of the good upload")
        await wait_until(
            lambda: queue_counts(sqs, queue.dead_letter_url).visible == 1,
            "the failed message in the dead-letter queue",
        )
        await wait_until(lambda: queue_counts(sqs, queue.url) == QueueCounts(0, 0), "an empty queue")
        assert not running.task.done()

    failures = log_lines(proxy_logs, "proxy.uploads", "key='original/bad.jpg'", "result=failed")
    # One failure per delivery: maxReceiveCount is 2, so the message came back once.
    assert len(failures) == 2
    assert "not an image in a supported format" in failures[0]
    assert log_lines(proxy_logs, "proxy.worker", "receive_count=2", "records failed")
    assert not all_keys(s3, bucket, "r/bad")

    dead = sqs.receive_message(QueueUrl=queue.dead_letter_url, MaxNumberOfMessages=10)["Messages"]
    assert len(dead) == 1
    record = json.loads(dead[0]["Body"])["Records"][0]
    assert unquote_plus(record["s3"]["object"]["key"]) == "original/bad.jpg"


NON_EVENT_BODIES = {
    "text": "this is not JSON",
    "json-object": '{"greeting": "hello"}',
    # Python's json module raises a plain ValueError for integers over 4300 digits.
    "huge-number": '{"Records": ' + "9" * 5000 + "}",
}


@pytest.mark.parametrize("body", NON_EVENT_BODIES.values(), ids=NON_EVENT_BODIES.keys())
async def test_worker_leaves_non_event_message(s3, sqs, bucket, s3_settings, make_queue, proxy_logs, body):
    queue = make_queue(visibility_timeout=SHORT_VISIBILITY_TIMEOUT, max_receive_count=1)
    notify(s3, bucket, queue, prefix="original/")
    sent = sqs.send_message(QueueUrl=queue.url, MessageBody=body)
    good_keys = variant_keys("r/after")

    async with running_worker(s3_settings, queue.url) as running:
        await wait_until(
            lambda: error_lines(proxy_logs, "proxy.worker", f"message id={sent['MessageId']}"),
            "the error logged for the message",
        )
        s3.put_object(Bucket=bucket, Key="original/after.jpg", Body=make_image(800, 600))
        await wait_until(has_keys(s3, bucket, good_keys), "the variants of the later upload")
        await wait_until(
            lambda: queue_counts(sqs, queue.dead_letter_url).visible == 1,
            "the message in the dead-letter queue",
        )
        assert not running.task.done()

    dead = sqs.receive_message(QueueUrl=queue.dead_letter_url, MaxNumberOfMessages=10)["Messages"]
    assert len(dead) == 1
    assert dead[0]["MessageId"] == sent["MessageId"]
    assert dead[0]["Body"] == body


async def test_worker_stop_returns_while_idle(s3_settings, make_queue):
    queue = make_queue()

    async with running_worker(s3_settings, queue.url) as running:
        await asyncio.sleep(WAIT_SECONDS)

    assert running.task.done()
    assert running.task.exception() is None


async def test_worker_missing_queue_stops_with_error(aws_env, s3_settings, proxy_logs):
    queue_url = f"{aws_env}/123456789012/no-such-queue-{uuid.uuid4().hex[:16]}"
    session = aioboto3.Session()

    async with open_upload_handler(s3_settings) as handler, session.client("sqs") as client:
        worker = SqsWorker(handler, client, queue_url, concurrency=2, wait_seconds=WAIT_SECONDS)
        await asyncio.wait_for(worker.run(), STOP_TIMEOUT)

    assert worker.fatal_error is not None
    assert "check --queue-url" in worker.fatal_error
    assert error_lines(proxy_logs, "proxy.worker", "cannot be read")


async def test_worker_stop_finishes_work_in_flight(s3, sqs, bucket, photo, s3_settings, make_queue):
    queue = make_queue()
    notify(s3, bucket, queue, prefix="original/")
    store = GatedStore(await open_store(s3_settings))
    executor = ThreadPoolExecutor(max_workers=2)
    handler = UploadHandler(store, s3_settings, executor)
    session = aioboto3.Session()
    try:
        async with session.client("sqs") as client:
            worker = SqsWorker(handler, client, queue.url, concurrency=2, wait_seconds=WAIT_SECONDS)
            task = asyncio.create_task(worker.run())
            s3.put_object(Bucket=bucket, Key=PHOTO_KEY, Body=photo)
            await asyncio.wait_for(store.writing.wait(), POLL_TIMEOUT)

            # Stopping while the variants wait to be written must not drop them.
            worker.stop()
            await asyncio.sleep(WAIT_SECONDS + 0.5)
            still_running = not task.done()
            store.release.set()
            await asyncio.wait_for(task, STOP_TIMEOUT)
    finally:
        executor.shutdown()
        await store.close()

    assert still_running
    assert has_keys(s3, bucket, variant_keys(PHOTO_VARIANT_BASE))()
    counts = queue_counts(sqs, queue.url)
    assert counts.visible == 0
    assert counts.not_visible == 0


class FailingPutStore(CountingStore):
    """Fail the write of one variant key with a store error."""

    def __init__(self, inner, failing_key):
        super().__init__(inner)
        self.failing_key = failing_key

    async def put(self, key, body, content_type, cache_control):
        if key == self.failing_key:
            raise StoreFailed(f"S3 PUT s3://test/{key} failed with InternalError")
        return await super().put(key, body, content_type, cache_control)


async def test_worker_keeps_message_when_write_fails(s3, sqs, bucket, photo, s3_settings, make_queue):
    queue = make_queue(visibility_timeout=SHORT_VISIBILITY_TIMEOUT)
    notify(s3, bucket, queue, prefix="original/")
    store = FailingPutStore(await open_store(s3_settings), f"{PHOTO_VARIANT_BASE}-720.webp")
    executor = ThreadPoolExecutor(max_workers=2)
    handler = UploadHandler(store, s3_settings, executor)
    session = aioboto3.Session()
    try:
        async with session.client("sqs") as client:
            worker = SqsWorker(handler, client, queue.url, concurrency=2, wait_seconds=WAIT_SECONDS)
            task = asyncio.create_task(worker.run())
            s3.put_object(Bucket=bucket, Key=PHOTO_KEY, Body=photo)
            await wait_until(lambda: store.count("put") >= 7, "the other variants to be written")
            await asyncio.sleep(WAIT_SECONDS)
            worker.stop()
            await asyncio.wait_for(task, STOP_TIMEOUT)
    finally:
        executor.shutdown()
        await store.close()

    counts = queue_counts(sqs, queue.url)
    assert counts.visible + counts.not_visible == 1


@pytest.fixture
def worker_process(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen]]:
    """Start `python -m proxy worker` processes, killed after the test if still running."""
    processes: list[subprocess.Popen] = []

    def start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log_file = open(tmp_path / f"worker-{len(processes)}.log", "wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "worker", *args],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
        log_file.close()
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def test_worker_command_stops_on_sigterm(aws_env, s3, bucket, photo, make_queue, worker_process, tmp_path):
    queue = make_queue()
    notify(s3, bucket, queue, prefix="original/")
    env = {name: value for name, value in os.environ.items() if not name.startswith(("PROXY_", "AWS_"))}
    env.update(FAKE_CREDENTIALS)
    env.update({"PROXY_STORAGE": f"s3://{bucket}", "AWS_ENDPOINT_URL": aws_env})
    # AWS_REGION alone, as the README shows: botocore itself reads only
    # AWS_DEFAULT_REGION, which once made the SQS client fail.
    del env["AWS_DEFAULT_REGION"]
    keys = variant_keys(PHOTO_VARIANT_BASE)

    process = worker_process(["--queue-url", queue.url, "--wait-seconds", str(WAIT_SECONDS)], env)
    s3.put_object(Bucket=bucket, Key=PHOTO_KEY, Body=photo, ContentType="image/jpeg")
    wait_until_sync(has_keys(s3, bucket, keys), "the 8 variants of the photo")
    process.send_signal(signal.SIGTERM)
    returncode = process.wait(timeout=STOP_TIMEOUT)

    log = (tmp_path / "worker-0.log").read_text(errors="replace")
    assert returncode == 0, log
    assert "worker started" in log
    assert "worker stopped" in log
    assert "Traceback" not in log


def test_worker_command_missing_queue_exits_1(aws_env, bucket, worker_process, tmp_path):
    env = {name: value for name, value in os.environ.items() if not name.startswith(("PROXY_", "AWS_"))}
    env.update(FAKE_CREDENTIALS)
    env.update({"PROXY_STORAGE": f"s3://{bucket}", "AWS_ENDPOINT_URL": aws_env})
    queue_url = f"{aws_env}/123456789012/no-such-queue-{uuid.uuid4().hex[:16]}"

    process = worker_process(["--queue-url", queue_url, "--wait-seconds", str(WAIT_SECONDS)], env)
    returncode = process.wait(timeout=STOP_TIMEOUT)

    log = (tmp_path / "worker-0.log").read_text(errors="replace")
    assert returncode == 1, log
    assert "check --queue-url" in log
    assert "Traceback" not in log
