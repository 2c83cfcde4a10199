"""The Lambda entry point `proxy.aws_lambda.handler` against moto's S3 server.

Events are built the way S3 and SQS deliver them to Lambda, with keys form-encoded
as in S3 notifications.
"""

import json
import logging
from collections.abc import Iterator
from urllib.parse import quote_plus

import pytest
from conftest import decode, make_image

from proxy import aws_lambda

WIDTHS = [360, 720, 1200, 2200]
FORMATS = ["jpg", "webp"]
JUNK = b"these bytes are no image at all"


def variant_keys(base: str) -> list[str]:
    return [f"{base}-{width}.{fmt}" for width in WIDTHS for fmt in FORMATS]


def s3_record(bucket: str, key: str, name: str = "ObjectCreated:Put") -> dict:
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "us-east-1",
        "eventTime": "2024-05-01T12:00:00.000Z",
        "eventName": name,
        "s3": {
            "s3SchemaVersion": "1.0",
            "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
            "object": {"key": quote_plus(key, safe="/"), "size": 1},
        },
    }


def s3_event(bucket: str, key: str, name: str = "ObjectCreated:Put") -> dict:
    return {"Records": [s3_record(bucket, key, name)]}


def sqs_record(message_id: str, body: str) -> dict:
    return {
        "messageId": message_id,
        "receiptHandle": f"handle-{message_id}",
        "body": body,
        "attributes": {"ApproximateReceiveCount": "1"},
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:uploads",
        "awsRegion": "us-east-1",
    }


def sqs_batch(*records: dict) -> dict:
    return {"Records": list(records)}


def stored_keys(s3, bucket: str, prefix: str) -> set[str]:
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {item["Key"] for item in listing.get("Contents", [])}


# Loggers whose levels the handler sets on its first call.
HANDLER_LOGGERS = ["", "pyvips", "botocore", "aiobotocore"]


@pytest.fixture
def lambda_bucket(bucket: str, settings_for, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Point the handler at the test bucket, with settings read again from the environment.

    The log levels that the handler sets are restored after the test.
    """
    settings_for(storage=f"s3://{bucket}")
    monkeypatch.setattr(aws_lambda, "_settings", None)
    levels = {name: logging.getLogger(name).level for name in HANDLER_LOGGERS}
    yield bucket
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_handler_s3_event_makes_variants(s3, lambda_bucket, photo):
    key = "original/trips/my trip/Été 01.jpg"
    s3.put_object(Bucket=lambda_bucket, Key=key, Body=photo, ContentType="image/jpeg")

    result = aws_lambda.handler(s3_event(lambda_bucket, key), None)

    assert result == {"records": 1, "failed": 0}
    assert stored_keys(s3, lambda_bucket, "r/") == set(variant_keys("r/trips/my trip/Été 01"))
    source_width = decode(photo).width
    for width in WIDTHS:
        for fmt in FORMATS:
            variant = f"r/trips/my trip/Été 01-{width}.{fmt}"
            image = decode(s3.get_object(Bucket=lambda_bucket, Key=variant)["Body"].read())
            assert image.width == min(width, source_width), variant


def test_handler_s3_delete_removes_variants(s3, lambda_bucket):
    key = "original/gone.jpg"
    s3.put_object(Bucket=lambda_bucket, Key=key, Body=make_image(800, 600))
    aws_lambda.handler(s3_event(lambda_bucket, key), None)
    s3.delete_object(Bucket=lambda_bucket, Key=key)

    result = aws_lambda.handler(s3_event(lambda_bucket, key, "ObjectRemoved:Delete"), None)

    assert result == {"records": 1, "failed": 0}
    assert stored_keys(s3, lambda_bucket, "r/") == set()


def test_handler_sqs_batch_reports_bad_record(s3, lambda_bucket):
    s3.put_object(Bucket=lambda_bucket, Key="original/first.jpg", Body=make_image(800, 600))
    s3.put_object(Bucket=lambda_bucket, Key="original/bad.jpg", Body=JUNK)
    s3.put_object(Bucket=lambda_bucket, Key="original/third.png", Body=make_image(640, 480, ".png"))
    event = sqs_batch(
        sqs_record("m1", json.dumps(s3_event(lambda_bucket, "original/first.jpg"))),
        sqs_record("m2", json.dumps(s3_event(lambda_bucket, "original/bad.jpg"))),
        sqs_record("m3", json.dumps(s3_event(lambda_bucket, "original/third.png"))),
    )

    result = aws_lambda.handler(event, None)

    assert result == {"batchItemFailures": [{"itemIdentifier": "m2"}]}
    variants = stored_keys(s3, lambda_bucket, "r/")
    assert set(variant_keys("r/first")) <= variants
    assert set(variant_keys("r/third")) <= variants
    assert not stored_keys(s3, lambda_bucket, "r/bad")


def test_handler_sqs_batch_reports_non_json(s3, lambda_bucket):
    s3.put_object(Bucket=lambda_bucket, Key="original/good.jpg", Body=make_image(800, 600))
    event = sqs_batch(
        sqs_record("not-json", "this is not JSON"),
        sqs_record("good", json.dumps(s3_event(lambda_bucket, "original/good.jpg"))),
        sqs_record("not-event", '{"greeting": "hello"}'),
        # Python's json module raises a plain ValueError for integers over 4300 digits.
        sqs_record("huge-number", '{"Records": ' + "9" * 5000 + "}"),
    )

    result = aws_lambda.handler(event, None)

    failed = [item["itemIdentifier"] for item in result["batchItemFailures"]]
    assert failed == ["not-json", "not-event", "huge-number"]
    assert stored_keys(s3, lambda_bucket, "r/") == set(variant_keys("r/good"))


def test_handler_sqs_test_event_succeeds(lambda_bucket):
    test_event = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": lambda_bucket}
    event = sqs_batch(sqs_record("m1", json.dumps(test_event)))

    result = aws_lambda.handler(event, None)

    assert result == {"batchItemFailures": []}


def test_handler_s3_event_failure_raises(s3, lambda_bucket):
    s3.put_object(Bucket=lambda_bucket, Key="original/good.jpg", Body=make_image(800, 600))
    s3.put_object(Bucket=lambda_bucket, Key="original/bad.jpg", Body=JUNK)
    event = {
        "Records": [
            s3_record(lambda_bucket, "original/good.jpg"),
            s3_record(lambda_bucket, "original/bad.jpg"),
        ]
    }

    with pytest.raises(aws_lambda.RecordsFailed) as raised:
        aws_lambda.handler(event, None)

    assert "1 of 2 records failed" in str(raised.value)
    assert "original/bad.jpg" in str(raised.value)
    assert stored_keys(s3, lambda_bucket, "r/") == set(variant_keys("r/good"))


def test_handler_other_bucket_skipped(s3, lambda_bucket):
    s3.put_object(Bucket=lambda_bucket, Key="original/photo.jpg", Body=make_image(800, 600))

    result = aws_lambda.handler(s3_event("someone-elses-bucket", "original/photo.jpg"), None)

    assert result == {"records": 1, "failed": 0}
    assert stored_keys(s3, lambda_bucket, "r/") == set()


def test_handler_sqs_other_bucket_skipped(s3, lambda_bucket):
    s3.put_object(Bucket=lambda_bucket, Key="original/photo.jpg", Body=make_image(800, 600))
    body = json.dumps(s3_event("someone-elses-bucket", "original/photo.jpg"))

    result = aws_lambda.handler(sqs_batch(sqs_record("m1", body)), None)

    assert result == {"batchItemFailures": []}
    assert stored_keys(s3, lambda_bucket, "r/") == set()


def test_handler_hides_libvips_steps(s3, lambda_bucket, caplog):
    # The test's own libvips calls come before INFO records are captured.
    s3.put_object(Bucket=lambda_bucket, Key="original/photo.jpg", Body=make_image(800, 600))
    caplog.set_level(logging.INFO)

    aws_lambda.handler(s3_event(lambda_bucket, "original/photo.jpg"), None)

    libvips = [record for record in caplog.records if record.name.startswith("pyvips")]
    assert libvips == []
    made_lines = [
        record.getMessage()
        for record in caplog.records
        if record.name == "proxy.uploads" and "result=made" in record.getMessage()
    ]
    assert len(made_lines) == 1


def test_handler_applies_log_level(s3, lambda_bucket, settings_for, caplog):
    settings_for(storage=f"s3://{lambda_bucket}", log_level="WARNING")
    s3.put_object(Bucket=lambda_bucket, Key="original/photo.jpg", Body=make_image(800, 600))
    caplog.set_level(logging.INFO)

    aws_lambda.handler(s3_event(lambda_bucket, "original/photo.jpg"), None)

    info = [record for record in caplog.records if record.name.startswith("proxy") and record.levelno < logging.WARNING]
    assert info == []
    assert stored_keys(s3, lambda_bucket, "r/") == set(variant_keys("r/photo"))
