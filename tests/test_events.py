"""`proxy.events.parse_document` on every envelope that S3 events arrive in."""

import json
import logging
from urllib.parse import quote_plus

import pytest
from event_documents import (
    AWKWARD_KEYS,
    CONFIRM_URL,
    ENVELOPES,
    encode_key,
    eventbridge_event,
    lambda_sns_records,
    lambda_sqs_records,
    s3_notification,
    s3_record,
    sns_notification,
    sns_subscription_confirmation,
)

from proxy.events import CREATED, MAX_DEPTH, REMOVED, InvalidEvent, ObjectEvent, parse_document

BUCKET = "photos"


def three_records() -> dict:
    return s3_notification(
        s3_record(BUCKET, "original/a.jpg", "ObjectCreated:Put"),
        s3_record(BUCKET, "original/b/c.png", "ObjectCreated:CompleteMultipartUpload"),
        s3_record(BUCKET, "original/d.jpg", "ObjectRemoved:Delete"),
    )


THREE_EVENTS = [
    ObjectEvent(BUCKET, "original/a.jpg", CREATED, "ObjectCreated:Put"),
    ObjectEvent(BUCKET, "original/b/c.png", CREATED, "ObjectCreated:CompleteMultipartUpload"),
    ObjectEvent(BUCKET, "original/d.jpg", REMOVED, "ObjectRemoved:Delete"),
]


def test_s3_records_give_every_event():
    assert parse_document(json.dumps(three_records())) == THREE_EVENTS


def test_s3_records_as_dict_parse():
    assert parse_document(three_records()) == THREE_EVENTS


def test_s3_records_as_bytes_parse():
    assert parse_document(json.dumps(three_records()).encode("utf-8")) == THREE_EVENTS


def test_sns_notification_unwraps_message():
    document = sns_notification(json.dumps(three_records()))

    assert parse_document(json.dumps(document)) == THREE_EVENTS


def test_lambda_sns_records_unwrap_message():
    document = lambda_sns_records(json.dumps(three_records()))

    assert parse_document(document) == THREE_EVENTS


def test_sqs_body_with_s3_json_parses():
    # The worker hands over an SQS message body as it was received.
    body = json.dumps(three_records())

    assert parse_document(body) == THREE_EVENTS


def test_sqs_body_with_sns_json_parses():
    body = json.dumps(sns_notification(json.dumps(three_records())))

    assert parse_document(body) == THREE_EVENTS


def test_lambda_sqs_records_join_bodies():
    first = s3_notification(s3_record(BUCKET, "original/a.jpg", "ObjectCreated:Put"))
    second = sns_notification(json.dumps(s3_notification(s3_record(BUCKET, "original/e.jpg", "ObjectRemoved:Delete"))))
    document = lambda_sqs_records(json.dumps(first), json.dumps(second))

    events = parse_document(document)

    assert events == [
        ObjectEvent(BUCKET, "original/a.jpg", CREATED, "ObjectCreated:Put"),
        ObjectEvent(BUCKET, "original/e.jpg", REMOVED, "ObjectRemoved:Delete"),
    ]


def test_eventbridge_object_created_parses():
    document = eventbridge_event(BUCKET, "original/a.jpg", "Object Created")

    assert parse_document(json.dumps(document)) == [
        ObjectEvent(BUCKET, "original/a.jpg", CREATED, "Object Created")
    ]


def test_eventbridge_object_deleted_parses():
    document = eventbridge_event(BUCKET, "original/a.jpg", "Object Deleted")

    assert parse_document(json.dumps(document)) == [
        ObjectEvent(BUCKET, "original/a.jpg", REMOVED, "Object Deleted")
    ]


def test_eventbridge_in_sqs_body_parses():
    body = json.dumps(eventbridge_event(BUCKET, "original/a.jpg", "Object Created"))

    assert parse_document(lambda_sqs_records(body)) == [
        ObjectEvent(BUCKET, "original/a.jpg", CREATED, "Object Created")
    ]


def test_eventbridge_other_detail_type_is_not_action():
    document = eventbridge_event(BUCKET, "original/a.jpg", "Object Tags Added")

    (event,) = parse_document(json.dumps(document))

    assert event.action not in (CREATED, REMOVED)


def test_s3_test_event_gives_no_events():
    document = {
        "Service": "Amazon S3",
        "Event": "s3:TestEvent",
        "Time": "2026-01-02T03:04:05.678Z",
        "Bucket": BUCKET,
        "RequestId": "5582815E1AEA5ADF",
        "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE",
    }

    assert parse_document(json.dumps(document)) == []


def test_s3_test_event_in_sns_gives_none():
    test_event = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": BUCKET}

    assert parse_document(json.dumps(sns_notification(json.dumps(test_event)))) == []


def test_empty_records_give_no_events():
    assert parse_document('{"Records": []}') == []


def test_subscription_confirmation_logs_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="proxy.events"):
        events = parse_document(json.dumps(sns_subscription_confirmation()))

    assert events == []
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "SubscriptionConfirmation" in warnings[0].getMessage()
    assert CONFIRM_URL in warnings[0].getMessage()


@pytest.mark.parametrize(
    ("event_name", "action"),
    [
        ("ObjectCreated:Put", CREATED),
        ("ObjectCreated:Post", CREATED),
        ("ObjectCreated:Copy", CREATED),
        ("ObjectCreated:CompleteMultipartUpload", CREATED),
        ("ObjectRemoved:Delete", REMOVED),
        ("ObjectRemoved:DeleteMarkerCreated", REMOVED),
        ("LifecycleExpiration:Delete", REMOVED),
        ("LifecycleExpiration:DeleteMarkerCreated", REMOVED),
    ],
)
def test_event_name_sets_action(event_name, action):
    document = s3_notification(s3_record(BUCKET, "original/a.jpg", event_name))

    (event,) = parse_document(json.dumps(document))

    assert event.action == action
    assert event.name == event_name


@pytest.mark.parametrize(
    "event_name",
    [
        "ObjectRestore:Completed",
        "ObjectRestore:Delete",
        "ObjectTagging:Put",
        "ObjectAcl:Put",
        "LifecycleTransition",
        "Replication:OperationFailedReplication",
    ],
)
def test_other_event_name_parses_without_action(event_name):
    document = s3_notification(s3_record(BUCKET, "original/a.jpg", event_name))

    (event,) = parse_document(json.dumps(document))

    assert event.action not in (CREATED, REMOVED)
    assert event.key == "original/a.jpg"
    assert event.name == event_name


@pytest.mark.parametrize("envelope", sorted(ENVELOPES))
@pytest.mark.parametrize("relative_key", AWKWARD_KEYS)
@pytest.mark.parametrize("action", [CREATED, REMOVED])
def test_awkward_key_decodes_once(envelope, relative_key, action):
    key = f"original/{relative_key}"
    document = ENVELOPES[envelope](BUCKET, key, action)

    events = parse_document(document)

    assert [event.key for event in events] == [key]
    assert [event.action for event in events] == [action]
    assert [event.bucket for event in events] == [BUCKET]


@pytest.mark.parametrize("relative_key", AWKWARD_KEYS)
def test_slash_encoded_as_2f_decodes(relative_key):
    # moto encodes `/` as `%2F`, which AWS leaves as it is. Both decode alike.
    key = f"original/{relative_key}"
    record = s3_record(BUCKET, key, encoded_key=quote_plus(key))

    (event,) = parse_document(json.dumps(s3_notification(record)))

    assert event.key == key


def test_space_as_plus_decodes_to_space():
    record = s3_record(BUCKET, "", encoded_key="original/my+trip/a+b.jpg")

    (event,) = parse_document(json.dumps(s3_notification(record)))

    assert event.key == "original/my trip/a b.jpg"


def test_encoded_plus_stays_plus():
    assert encode_key("original/a+b.jpg") == "original/a%2Bb.jpg"

    (event,) = parse_document(json.dumps(s3_notification(s3_record(BUCKET, "original/a+b.jpg"))))

    assert event.key == "original/a+b.jpg"


def test_eventbridge_key_is_not_decoded():
    # EventBridge sends keys unencoded, so a key that looks encoded is kept as it is.
    document = eventbridge_event(BUCKET, "original/50%25+x.jpg")

    (event,) = parse_document(json.dumps(document))

    assert event.key == "original/50%25+x.jpg"


def nested_sns(depth: int) -> str:
    """An S3 event wrapped in `depth` SNS notifications."""
    text = json.dumps(s3_notification(s3_record(BUCKET, "original/a.jpg")))
    for _ in range(depth):
        text = json.dumps(sns_notification(text))
    return text


def test_nesting_at_limit_parses():
    (event,) = parse_document(nested_sns(MAX_DEPTH))

    assert event.key == "original/a.jpg"


# Marks a field that s3_record_with removes.
DELETE = object()


def s3_record_with(**changes) -> str:
    """An S3 notification whose one record has `changes`, each path spelled with `__`."""
    record = s3_record(BUCKET, "original/a.jpg")
    for path, value in changes.items():
        *parents, last = path.split("__")
        target = record
        for name in parents:
            target = target[name]
        if value is DELETE:
            del target[last]
        else:
            target[last] = value
    return json.dumps(s3_notification(record))


@pytest.mark.parametrize(
    ("document", "expected_message"),
    [
        pytest.param("not json", "not valid JSON", id="not-json"),
        pytest.param("", "not valid JSON", id="empty"),
        pytest.param(b"\xff\xfe{", "not valid UTF-8", id="not-utf8"),
        pytest.param("[]", "expected a JSON object, got list", id="json-array"),
        pytest.param('"Records"', "expected a JSON object, got str", id="json-string"),
        pytest.param('{"hello": "world"}', "not an S3 event", id="other-object"),
        pytest.param('{"Records": {"eventSource": "aws:s3"}}', "Records must be a list", id="records-object"),
        pytest.param('{"Records": [7]}', "Records[0] is not an object", id="record-number"),
        pytest.param(
            s3_record_with(s3__object__key=DELETE), "missing field Records[0].s3.object.key", id="no-key"
        ),
        pytest.param(
            s3_record_with(s3__object__key=17), "field Records[0].s3.object.key must be a string", id="key-number"
        ),
        pytest.param(
            s3_record_with(s3__bucket__name=None), "field Records[0].s3.bucket.name must be a string", id="bucket-null"
        ),
        pytest.param(s3_record_with(eventName=DELETE), "missing field Records[0].eventName", id="no-event-name"),
        pytest.param(
            s3_record_with(eventSource="aws:kinesis"), "unknown eventSource 'aws:kinesis'", id="unknown-source"
        ),
        pytest.param(s3_record_with(eventSource=DELETE), "unknown eventSource None", id="no-source"),
        pytest.param(
            s3_record_with(s3__object__key="original/%ff.jpg"), "not valid UTF-8 once decoded", id="key-bad-utf8"
        ),
        pytest.param(
            s3_record_with(s3__object__key="original/%C3.jpg"), "not valid UTF-8 once decoded", id="key-cut-utf8"
        ),
        pytest.param(nested_sns(MAX_DEPTH + 1), f"nested more than {MAX_DEPTH} deep", id="nested-envelopes"),
        pytest.param("[" * 100_000 + "]" * 100_000, "nested too deeply", id="nested-json"),
        pytest.param(
            json.dumps({"Type": "Notification", "Message": "plain text"}), "not valid JSON", id="sns-message-text"
        ),
        pytest.param(
            json.dumps({"Records": [{"EventSource": "aws:sns", "Sns": {}}]}),
            "missing field Records[0].Sns.Message",
            id="lambda-sns-no-message",
        ),
        pytest.param(
            json.dumps({"Records": [{"eventSource": "aws:sqs", "body": {"Records": []}}]}),
            "field Records[0].body must be a string, got dict",
            id="lambda-sqs-body-object",
        ),
        pytest.param(
            json.dumps({**eventbridge_event(BUCKET, "original/a.jpg"), "detail": {"bucket": {"name": BUCKET}}}),
            "missing field detail.object.key",
            id="eventbridge-no-key",
        ),
    ],
)
def test_invalid_document_raises_with_reason(document, expected_message):
    with pytest.raises(InvalidEvent) as raised:
        parse_document(document)

    assert expected_message in str(raised.value)


def test_huge_integer_is_invalid_event():
    # Python's json module raises a plain ValueError for integers over 4300 digits.
    with pytest.raises(InvalidEvent):
        parse_document('{"Records": ' + "9" * 5000 + "}")
