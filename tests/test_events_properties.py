"""Property-based tests of parse_document and source_of, generated with hypothesis.

Any document either gives a list of ObjectEvent or raises InvalidEvent, and a key
survives each envelope's encoding unchanged. source_of returns for any text, and
the variant URLs of each source it accepts parse back to that source.
"""

import json
from pathlib import Path
from urllib.parse import quote

from event_documents import (
    eventbridge_event,
    lambda_sns_records,
    lambda_sqs_records,
    s3_notification,
    s3_record,
    sns_notification,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.events import InvalidEvent, ObjectEvent, parse_document
from proxy.paths import parse_variant_path
from proxy.settings import OUTPUT_FORMATS
from proxy.uploads import Source, source_of

# Derandomized and without the example database, so every run, local or CI, tries
# the same examples. The fixtures only build Settings, which no example changes,
# so sharing them across examples is safe.
PROPERTIES = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5),
    max_leaves=30,
)

# Field names and values that steer the parser into each branch, so generated
# documents get past the first type check more often than random text would.
EVENT_WORDS = st.sampled_from(
    [
        "Records", "eventSource", "EventSource", "aws:s3", "aws:sns", "aws:sqs", "Sns",
        "Message", "body", "s3", "bucket", "name", "object", "key", "eventName",
        "ObjectCreated:Put", "ObjectRemoved:Delete", "Event", "s3:TestEvent", "Type",
        "Notification", "SubscriptionConfirmation", "detail-type", "source", "aws.s3",
        "detail", "Object Created", "%", "%FF", "%C3", "+",
    ]
)
EVENT_SHAPED = st.recursive(
    JSON_SCALARS | EVENT_WORDS,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(EVENT_WORDS, children, max_size=4)
        # An envelope field contains its inner document as JSON text.
        | children.map(json.dumps)
    ),
    max_leaves=25,
)

# Any Unicode text that UTF-8 can encode, which is every key S3 can store.
KEYS = st.text(st.characters(exclude_categories=("Cs",)), min_size=1)
# Python strings from JSON may contain lone surrogates, so source_of gets them too.
ANY_TEXT = st.text(st.characters())


def assert_events(result: object) -> None:
    assert isinstance(result, list)
    for event in result:
        assert isinstance(event, ObjectEvent)


def parse_or_invalid(document: object) -> None:
    try:
        result = parse_document(document)
    except InvalidEvent:
        return
    assert_events(result)


# Arbitrary input


@PROPERTIES
@given(document=JSON_VALUES)
def test_any_json_value_parses_or_invalid(document):
    parse_or_invalid(document)


@PROPERTIES
@given(document=JSON_VALUES)
def test_any_json_text_parses_or_invalid(document):
    parse_or_invalid(json.dumps(document))
    parse_or_invalid(json.dumps(document).encode())


@PROPERTIES
@given(document=EVENT_SHAPED)
def test_event_shaped_value_parses_or_invalid(document):
    parse_or_invalid(document)
    parse_or_invalid(json.dumps(document))


@PROPERTIES
@given(text=st.text())
@example(text="1" * 5000)
@example(text="[" * 100_000)
@example(text="\ufeff{}")
@example(text=json.dumps({"Type": "Notification", "Message": "[" * 100_000}))
def test_any_text_parses_or_invalid(text):
    parse_or_invalid(text)


@PROPERTIES
@given(data=st.binary())
@example(data=b"\xef\xbb\xbf{}")
@example(data=b"\xff\xfe{\x00")
@example(data='{"Records": "\xff"}'.encode("utf-16-le"))
def test_any_bytes_parse_or_invalid(data):
    parse_or_invalid(data)


@PROPERTIES
@given(encoded_key=ANY_TEXT | st.lists(st.sampled_from(["%", "%2", "%FF", "%C3", "%ED%A0%80", "+", "a", "/"])).map("".join))
def test_any_encoded_key_parses_or_invalid(encoded_key):
    parse_or_invalid(s3_notification(s3_record("photos", "", encoded_key=encoded_key)))


FIELD_PATHS = [
    ("eventSource",),
    ("eventName",),
    ("s3",),
    ("s3", "bucket"),
    ("s3", "bucket", "name"),
    ("s3", "object"),
    ("s3", "object", "key"),
]


@PROPERTIES
@given(path=st.sampled_from(FIELD_PATHS), value=JSON_VALUES)
def test_record_with_any_field_parses_or_invalid(path, value):
    record = s3_record("photos", "a.jpg")
    parent = record
    for name in path[:-1]:
        parent = parent[name]
    parent[path[-1]] = value

    parse_or_invalid(s3_notification(record))
    parse_or_invalid(lambda_sqs_records(json.dumps(s3_notification(record))))


# Key round trip through each envelope


def only_key(document: object) -> str:
    events = parse_document(document)
    assert len(events) == 1
    return events[0].key


@PROPERTIES
@given(key=KEYS)
def test_s3_notification_key_round_trips(key):
    document = s3_notification(s3_record("photos", key))

    assert only_key(document) == key
    assert only_key(json.dumps(document)) == key
    assert only_key(json.dumps(document).encode()) == key


@PROPERTIES
@given(key=KEYS)
def test_sns_notification_key_round_trips(key):
    message = json.dumps(s3_notification(s3_record("photos", key)))

    assert only_key(sns_notification(message)) == key
    assert only_key(json.dumps(sns_notification(message))) == key
    assert only_key(lambda_sns_records(message)) == key


@PROPERTIES
@given(key=KEYS)
def test_sqs_body_key_round_trips(key):
    message = json.dumps(s3_notification(s3_record("photos", key)))

    assert only_key(lambda_sqs_records(message)) == key
    assert only_key(lambda_sqs_records(json.dumps(sns_notification(message)))) == key


@PROPERTIES
@given(key=KEYS)
def test_eventbridge_key_round_trips(key):
    document = eventbridge_event("photos", key)

    assert only_key(document) == key
    assert only_key(json.dumps(document)) == key


# source_of


@PROPERTIES
@given(key=ANY_TEXT, relative=ANY_TEXT, extension=st.sampled_from(["jpg", "PNG", "webp", "txt", ""]))
def test_source_of_any_key_returns(settings_for, tmp_path: Path, key, relative, extension):
    settings = settings_for(storage=str(tmp_path))

    for candidate in (key, f"original/{relative}.{extension}", f"r/{relative}"):
        result = source_of(candidate, settings)
        assert isinstance(result, (Source, str))


@PROPERTIES
@given(key=ANY_TEXT)
def test_source_of_whole_bucket_returns(settings_for, tmp_path: Path, key):
    settings = settings_for(storage=str(tmp_path), source_prefix="")

    assert isinstance(source_of(key, settings), (Source, str))
    assert isinstance(source_of(f"{key}.jpg", settings), (Source, str))


# Pieces that sit next to source_of's checks, so more generated keys pass them all.
KEY_PIECES = st.sampled_from(["a", "r", ".", "..", "-720", "-", "\\", "\x85", "\u2028", "é", " ", "/"]) | st.text(
    max_size=3
)
KEY_PARTS = st.lists(KEY_PIECES, min_size=1, max_size=4).map("".join)


@PROPERTIES
@given(
    prefix=st.sampled_from(["original/", "original/r/", "r/", ""]),
    folders=st.lists(KEY_PARTS, max_size=3),
    stem=KEY_PARTS,
    extension=st.sampled_from(["jpg", "JPEG", "png", "heic", "txt", ""]),
)
def test_source_variants_parse_back(settings_for, tmp_path: Path, prefix, folders, stem, extension):
    settings = settings_for(storage=str(tmp_path))
    source = source_of(prefix + "/".join([*folders, f"{stem}.{extension}"]), settings)
    if not isinstance(source, Source):
        return

    for width in settings.widths:
        for output_format in OUTPUT_FORMATS:
            variant_key = f"{settings.variant_prefix}{source.stem_path}-{width}.{output_format}"
            request = parse_variant_path(quote(f"/{variant_key}").encode(), settings)
            assert request.key == variant_key
            assert request.source_base == settings.source_prefix + source.stem_path
