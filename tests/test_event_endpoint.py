"""`POST /events/s3` on moto's S3 server: authentication, limits and outcomes."""

import asyncio
import base64
import json
from urllib.parse import quote_plus

import pytest
from conftest import CountingStore, GatedStore, decode, running_app

from proxy.store import open_store

TOKEN = "s3cret-token"


def s3_event(bucket: str, key: str, name: str = "ObjectCreated:Put") -> dict:
    return {
        "Records": [
            {
                "eventSource": "aws:s3",
                "eventName": name,
                "s3": {"bucket": {"name": bucket}, "object": {"key": quote_plus(key, safe="/")}},
            }
        ]
    }


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def basic(user: str, password: str) -> dict[str, str]:
    credentials = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {credentials}"}


def stored_keys(s3, bucket: str, prefix: str = "r/") -> list[str]:
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for item in listing.get("Contents", []))


@pytest.fixture
def event_settings(bucket, settings_for):
    return settings_for(storage=f"s3://{bucket}", event_token=TOKEN)


async def test_created_event_makes_all_variants(s3, bucket, photo, event_settings):
    s3.put_object(Bucket=bucket, Key="original/trips/p.jpg", Body=photo)

    async with running_app(event_settings) as client:
        response = await client.post("/events/s3", json=s3_event(bucket, "original/trips/p.jpg"), headers=bearer())

    assert response.status_code == 200
    summary = response.json()
    assert summary["made"] == 1
    assert summary["failed"] == 0
    expected = [f"r/trips/p-{width}.{fmt}" for width in (1200, 2200, 360, 720) for fmt in ("jpg", "webp")]
    assert stored_keys(s3, bucket) == sorted(expected)
    body = s3.get_object(Bucket=bucket, Key="r/trips/p-720.webp")["Body"].read()
    assert decode(body).width == 720


async def test_removed_event_deletes_variants(s3, bucket, photo, event_settings):
    s3.put_object(Bucket=bucket, Key="original/p.jpg", Body=photo)
    async with running_app(event_settings) as client:
        await client.post("/events/s3", json=s3_event(bucket, "original/p.jpg"), headers=bearer())
        s3.delete_object(Bucket=bucket, Key="original/p.jpg")
        response = await client.post(
            "/events/s3", json=s3_event(bucket, "original/p.jpg", "ObjectRemoved:Delete"), headers=bearer()
        )

    assert response.status_code == 200
    assert response.json()["deleted"] == 1
    assert stored_keys(s3, bucket) == []


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": "Bearer "},
        {"Authorization": TOKEN},
        {"Authorization": "Basic not-base64!"},
        basic("user", "wrong"),
        basic(TOKEN, ""),
    ],
    ids=["none", "wrong", "longer", "empty", "no-scheme", "bad-basic", "basic-wrong", "token-as-user"],
)
async def test_missing_or_wrong_token_returns_401(s3, bucket, photo, event_settings, headers):
    s3.put_object(Bucket=bucket, Key="original/p.jpg", Body=photo)
    counting = CountingStore(await open_store(event_settings))

    async with running_app(event_settings, counting) as client:
        response = await client.post("/events/s3", json=s3_event(bucket, "original/p.jpg"), headers=headers)

    assert response.status_code == 401
    assert "Bearer" in response.headers["www-authenticate"]
    assert counting.calls == []
    assert stored_keys(s3, bucket) == []


async def test_basic_auth_with_token_password_accepted(s3, bucket, photo, event_settings):
    # SNS HTTPS subscriptions carry credentials as user:password in the URL.
    s3.put_object(Bucket=bucket, Key="original/p.jpg", Body=photo)

    async with running_app(event_settings) as client:
        response = await client.post("/events/s3", json=s3_event(bucket, "original/p.jpg"), headers=basic("sns", TOKEN))

    assert response.status_code == 200
    assert response.json()["made"] == 1


async def test_endpoint_off_without_token(bucket, settings_for):
    settings = settings_for(storage=f"s3://{bucket}", event_token="")

    async with running_app(settings) as client:
        response = await client.post("/events/s3", json=s3_event(bucket, "original/p.jpg"), headers=bearer())

    assert response.status_code == 404
    assert "PROXY_EVENT_TOKEN" in response.text


async def test_other_bucket_skipped(s3, bucket, photo, event_settings):
    s3.put_object(Bucket=bucket, Key="original/p.jpg", Body=photo)
    counting = CountingStore(await open_store(event_settings))

    async with running_app(event_settings, counting) as client:
        response = await client.post("/events/s3", json=s3_event("someone-else", "original/p.jpg"), headers=bearer())

    assert response.status_code == 200
    assert response.json()["skipped"] == 1
    assert counting.calls == []


async def test_variant_key_event_does_no_work(s3, bucket, event_settings):
    counting = CountingStore(await open_store(event_settings))

    async with running_app(event_settings, counting) as client:
        response = await client.post("/events/s3", json=s3_event(bucket, "r/p-720.jpg"), headers=bearer())

    assert response.status_code == 200
    assert response.json()["skipped"] == 1
    assert counting.calls == []


async def test_failed_record_returns_502(s3, bucket, event_settings):
    s3.put_object(Bucket=bucket, Key="original/bad.jpg", Body=b"not an image" * 100)

    async with running_app(event_settings) as client:
        response = await client.post("/events/s3", json=s3_event(bucket, "original/bad.jpg"), headers=bearer())

    assert response.status_code == 502
    summary = response.json()
    assert summary["failed"] == 1
    assert summary["failures"][0]["key"] == "original/bad.jpg"
    assert "not an image" in summary["failures"][0]["reason"]
    assert stored_keys(s3, bucket) == []


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", b'{"hello": "world"}', b'{"Records": "x"}', b"\xff\xfe"],
    ids=["text", "array", "object", "records-not-list", "bad-utf8"],
)
async def test_non_event_document_returns_400(event_settings, body):
    async with running_app(event_settings) as client:
        response = await client.post("/events/s3", content=body, headers=bearer())

    assert response.status_code == 400
    assert response.text.startswith("invalid event document")


async def test_test_event_accepted_with_no_work(bucket, event_settings):
    document = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": bucket}

    async with running_app(event_settings) as client:
        response = await client.post("/events/s3", json=document, headers=bearer())

    assert response.status_code == 200
    assert response.json()["records"] == 0


async def test_oversized_body_returns_413(bucket, settings_for):
    settings = settings_for(storage=f"s3://{bucket}", event_token=TOKEN, event_max_bytes="2048")
    document = json.dumps(s3_event(bucket, "original/" + "a" * 4000 + ".jpg")).encode()

    async with running_app(settings) as client:
        declared = await client.post("/events/s3", content=document, headers=bearer())

        async def chunks():
            # A chunked body has no Content-Length, so the cap applies while reading.
            for start in range(0, len(document), 1000):
                yield document[start : start + 1000]

        streamed = await client.post("/events/s3", content=chunks(), headers=bearer())

    assert declared.status_code == 413
    assert streamed.status_code == 413
    assert "PROXY_EVENT_MAX_BYTES" in streamed.text


async def test_too_many_records_returns_413(s3, bucket, settings_for):
    settings = settings_for(storage=f"s3://{bucket}", event_token=TOKEN, event_max_records="2")
    document = {"Records": [s3_event(bucket, f"original/{n}.jpg")["Records"][0] for n in range(3)]}
    counting = CountingStore(await open_store(settings))

    async with running_app(settings, counting) as client:
        response = await client.post("/events/s3", json=document, headers=bearer())

    assert response.status_code == 413
    assert "PROXY_EVENT_MAX_RECORDS" in response.text
    assert counting.calls == []


async def test_sns_notification_accepted(s3, bucket, photo, event_settings):
    s3.put_object(Bucket=bucket, Key="original/my trip/p 1.jpg", Body=photo)
    notification = {
        "Type": "Notification",
        "MessageId": "abc",
        "TopicArn": "arn:aws:sns:us-east-1:123456789012:uploads",
        "Message": json.dumps(s3_event(bucket, "original/my trip/p 1.jpg")),
    }

    async with running_app(event_settings) as client:
        response = await client.post("/events/s3", json=notification, headers=basic("sns", TOKEN))

    assert response.status_code == 200
    assert "r/my trip/p 1-360.jpg" in stored_keys(s3, bucket)


async def test_reupload_refreshes_memory_cache(s3, bucket, photo, event_settings):
    s3.put_object(Bucket=bucket, Key="original/p.jpg", Body=photo)

    async with running_app(event_settings) as client:
        before = await client.get("/r/p-360.jpg")
        s3.put_object(Bucket=bucket, Key="original/p.jpg", Body=decode(photo).flip("horizontal").jpegsave_buffer())
        await client.post("/events/s3", json=s3_event(bucket, "original/p.jpg"), headers=bearer())
        after = await client.get("/r/p-360.jpg")

    assert before.status_code == 200
    assert after.status_code == 200
    assert after.content != before.content
    assert after.content == s3.get_object(Bucket=bucket, Key="r/p-360.jpg")["Body"].read()


async def test_busy_endpoint_returns_503(s3, bucket, photo, settings_for):
    settings = settings_for(storage=f"s3://{bucket}", event_token=TOKEN, event_concurrency="1")
    s3.put_object(Bucket=bucket, Key="original/p.jpg", Body=photo)
    store = GatedStore(await open_store(settings))

    async with running_app(settings, store) as client:
        first = asyncio.ensure_future(
            client.post("/events/s3", json=s3_event(bucket, "original/p.jpg"), headers=bearer())
        )
        await asyncio.wait_for(store.writing.wait(), 30)
        second = await client.post("/events/s3", json=s3_event(bucket, "original/p.jpg"), headers=bearer())
        store.release.set()
        first_response = await first
        third = await client.post("/events/s3", json=s3_event(bucket, "original/p.jpg"), headers=bearer())

    assert second.status_code == 503
    assert second.headers["retry-after"] == "1"
    assert "PROXY_EVENT_CONCURRENCY" in second.text
    assert first_response.status_code == 200
    assert third.status_code == 200
