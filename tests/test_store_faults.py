"""Tests of the app while its S3 store fails and after the store recovers.

The app reaches moto through a TCP relay on 127.0.0.1 (tests/tcp_relay.py) that
each test switches between forwarding, refusing connections and stalling.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from conftest import decode, running_app
from tcp_relay import FORWARD, REFUSE, STALL, TcpRelay, running_relay

SOURCE_KEY = "original/a/b/photo.jpg"
VARIANT_KEY = "r/a/b/photo-720.jpg"
VARIANT_URL = "/" + VARIANT_KEY

CONNECT_TIMEOUT = 1
READ_TIMEOUT = 1
MAX_ATTEMPTS = 2
# A functional bound, not a performance target. Every attempt may use its whole
# connect and read timeouts, and 5 s more cover the retry back-off, the resize and
# a busy test machine.
FAILURE_BOUND = MAX_ATTEMPTS * (CONNECT_TIMEOUT + READ_TIMEOUT) + 5
# Past this, a request counts as hung: the test fails instead of waiting on.
HANG_LIMIT = 2 * FAILURE_BOUND

# Max length of an error body. The message is one line that names the operation,
# so a longer body points to a traceback or a dump.
MAX_ERROR_BODY_CHARS = 300


@pytest.fixture
async def relay(aws_env: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[TcpRelay]:
    """A relay to moto, set as the app's S3 endpoint. The `s3` fixture still goes direct."""
    async with running_relay(aws_env) as relay:
        monkeypatch.setenv("AWS_ENDPOINT_URL", relay.url)
        yield relay


@pytest.fixture
def fault_settings(bucket: str, settings_for):
    return settings_for(
        storage=f"s3://{bucket}",
        s3_connect_timeout=CONNECT_TIMEOUT,
        s3_read_timeout=READ_TIMEOUT,
        s3_max_attempts=MAX_ATTEMPTS,
    )


@pytest.fixture
def source(s3, bucket: str, photo: bytes) -> str:
    s3.put_object(Bucket=bucket, Key=SOURCE_KEY, Body=photo, ContentType="image/jpeg")
    return SOURCE_KEY


async def timed_get(client: httpx.AsyncClient, url: str) -> tuple[httpx.Response, float]:
    """Send GET `url` and return the response with its duration in seconds.

    The test fails if no response arrives within HANG_LIMIT.
    """
    started = time.monotonic()
    try:
        async with asyncio.timeout(HANG_LIMIT):
            response = await client.get(url)
    except TimeoutError:
        pytest.fail(f"GET {url} got no response within {HANG_LIMIT} s")
    return response, time.monotonic() - started


async def bounded_get(client: httpx.AsyncClient, url: str) -> httpx.Response:
    response, _ = await timed_get(client, url)
    return response


def stored_keys(s3, bucket: str) -> list[str]:
    listing = s3.list_objects_v2(Bucket=bucket)
    return [item["Key"] for item in listing.get("Contents", [])]


@pytest.mark.usefixtures("source")
async def test_refused_store_returns_502(
    relay: TcpRelay, fault_settings, caplog: pytest.LogCaptureFixture
) -> None:
    await relay.set_mode(REFUSE)

    async with running_app(fault_settings) as client:
        with caplog.at_level(logging.INFO):
            response, elapsed = await timed_get(client, VARIANT_URL)

    assert response.status_code == 502
    assert response.headers["content-type"].startswith("text/plain")
    # A passing store failure must not stay in an edge cache.
    assert response.headers["cache-control"] == "no-store"
    assert "S3 GET" in response.text
    assert VARIANT_KEY in response.text
    assert "Traceback" not in response.text
    assert len(response.text) < MAX_ERROR_BODY_CHARS
    assert elapsed < FAILURE_BOUND
    # A store failure is an expected error, so it is logged without a traceback.
    assert [record.getMessage() for record in caplog.records if record.exc_info] == []


@pytest.mark.usefixtures("source")
async def test_stalled_store_returns_504(relay: TcpRelay, fault_settings) -> None:
    await relay.set_mode(STALL)

    async with running_app(fault_settings) as client:
        response, elapsed = await timed_get(client, VARIANT_URL)

    assert response.status_code == 504
    assert response.headers["content-type"].startswith("text/plain")
    # A passing store failure must not stay in an edge cache.
    assert response.headers["cache-control"] == "no-store"
    assert "S3 GET" in response.text
    assert "timed out" in response.text
    assert "Traceback" not in response.text
    assert len(response.text) < MAX_ERROR_BODY_CHARS
    # At least one read timeout passed, so the relay did stall the request.
    assert elapsed >= READ_TIMEOUT
    assert elapsed < FAILURE_BOUND


@pytest.mark.usefixtures("source")
async def test_stalled_get_uses_max_attempts(relay: TcpRelay, fault_settings) -> None:
    await relay.set_mode(STALL)

    async with running_app(fault_settings) as client:
        response = await bounded_get(client, VARIANT_URL)

    assert response.status_code == 504
    # Each attempt after a read timeout opens a new connection, and the stall
    # started before the app opened any, so connections count attempts.
    assert relay.connection_count == MAX_ATTEMPTS


@pytest.mark.parametrize(("fault", "status"), [(REFUSE, 502), (STALL, 504)])
async def test_variant_recovers_after_fault(
    relay: TcpRelay, fault_settings, source: str, s3, bucket: str, fault: str, status: int
) -> None:
    async with running_app(fault_settings) as client:
        await relay.set_mode(fault)
        failed, _ = await timed_get(client, VARIANT_URL)
        keys_after_failure = stored_keys(s3, bucket)

        await relay.set_mode(FORWARD)
        recovered, elapsed = await timed_get(client, VARIANT_URL)

    assert failed.status_code == status
    assert keys_after_failure == [source]
    assert recovered.status_code == 200
    assert recovered.headers["content-type"] == "image/jpeg"
    assert decode(recovered.content).width == 720
    # The request after recovery does not wait out a back-off or timeout left over
    # from the failure.
    assert elapsed < FAILURE_BOUND
    stored = s3.get_object(Bucket=bucket, Key=VARIANT_KEY)
    assert stored["ContentType"] == "image/jpeg"
    assert decode(stored["Body"].read()).width == 720


async def test_stalled_put_stores_nothing(
    relay: TcpRelay, fault_settings, source: str, s3, bucket: str
) -> None:
    # The reads of the variant and of the source pass, and the write stalls.
    relay.stall_on(b"PUT ")

    async with running_app(fault_settings) as client:
        failed, elapsed = await timed_get(client, VARIANT_URL)
        keys_after_failure = stored_keys(s3, bucket)

        await relay.set_mode(FORWARD)
        recovered = await bounded_get(client, VARIANT_URL)

    assert failed.status_code == 504
    assert "S3 PUT" in failed.text
    assert elapsed < FAILURE_BOUND
    assert keys_after_failure == [source]
    assert recovered.status_code == 200
    assert decode(recovered.content).width == 720
    # The object exists only if the app made and stored the variant again, so the
    # variant whose PUT failed was not kept in memory.
    stored = s3.get_object(Bucket=bucket, Key=VARIANT_KEY)
    assert decode(stored["Body"].read()).width == 720


async def test_cached_variant_survives_store_fault(
    relay: TcpRelay, fault_settings, source: str
) -> None:
    async with running_app(fault_settings) as client:
        first = await bounded_get(client, VARIANT_URL)
        await relay.set_mode(REFUSE)
        # The memory cache serves a variant already made, with no store request.
        second = await bounded_get(client, VARIANT_URL)

    assert first.status_code == 200
    assert second.status_code == 200
    assert second.content == first.content


@pytest.mark.parametrize(("fault", "status"), [(REFUSE, 502), (STALL, 504)])
async def test_readyz_fails_while_store_down(
    relay: TcpRelay, fault_settings, fault: str, status: int
) -> None:
    async with running_app(fault_settings) as client:
        before = await bounded_get(client, "/readyz")
        await relay.set_mode(fault)
        down, elapsed = await timed_get(client, "/readyz")
        await relay.set_mode(FORWARD)
        back = await bounded_get(client, "/readyz")

    assert before.status_code == 200
    assert down.status_code == status
    assert "S3 HEAD" in down.text
    assert "Traceback" not in down.text
    assert elapsed < FAILURE_BOUND
    assert back.status_code == 200
    assert back.text.startswith("ready:")
