"""Parse S3 object events from every envelope they arrive in.

Accepted documents:
- an S3 event notification: `{"Records": [{"eventSource": "aws:s3", ...}, ...]}`;
- the same inside an SNS notification (`{"Type": "Notification", "Message": "..."}`),
  or inside the SNS records that SNS gives a Lambda function;
- the same inside SQS message bodies, or inside the SQS records of a Lambda batch;
  a body may hold an SNS notification in turn;
- EventBridge "Object Created" and "Object Deleted" events;
- `s3:TestEvent`, which S3 sends when a notification is configured, and an SNS
  subscription confirmation; both give no events.

S3 notifications encode keys like an HTML form: `+` is a space, `%2B` a plus and
other bytes are UTF-8 percent-encoded. EventBridge sends keys as they are. Each key
is decoded once, by the rule of the envelope it came in.
"""

import json
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

logger = logging.getLogger(__name__)

CREATED = "created"
REMOVED = "removed"

# SNS inside SQS inside SNS is as deep as real deliveries go; more is rejected.
MAX_DEPTH = 4


class InvalidEvent(ValueError):
    """A document that is not an S3 event in any accepted shape."""


@dataclass(frozen=True)
class ObjectEvent:
    bucket: str
    # The object key, decoded.
    key: str
    # CREATED or REMOVED.
    action: str
    # The event name as sent, for logs: `ObjectCreated:Put`, `Object Deleted`.
    name: str


def parse_document(document: Any) -> list[ObjectEvent]:
    """Return the object events in a document, a JSON text or the decoded value.

    Raises InvalidEvent for anything that is not an accepted event shape.
    """
    return _parse(document, depth=0)


def _parse(document: Any, depth: int) -> list[ObjectEvent]:
    if depth > MAX_DEPTH:
        raise InvalidEvent(f"envelopes are nested more than {MAX_DEPTH} deep")
    if isinstance(document, (str, bytes)):
        document = _load_json(document)
    if not isinstance(document, dict):
        raise InvalidEvent(f"expected a JSON object, got {type(document).__name__}")

    if "Records" in document:
        return _parse_records(document["Records"], depth)
    if document.get("Event") == "s3:TestEvent":
        return []
    if "detail-type" in document and document.get("source") == "aws.s3":
        return [_parse_eventbridge(document)]
    if document.get("Type") == "Notification" and "Message" in document:
        return _parse(document["Message"], depth + 1)
    if document.get("Type") in ("SubscriptionConfirmation", "UnsubscribeConfirmation"):
        # Confirming means fetching SubscribeURL, which this service never does on
        # its own: an operator confirms the subscription once.
        logger.warning(
            # %r keeps newlines in these untrusted fields from forging log lines.
            "SNS %r received topic=%r; open its SubscribeURL once to confirm: %r",
            document["Type"],
            document.get("TopicArn", "-"),
            document.get("SubscribeURL", "-"),
        )
        return []
    raise InvalidEvent(
        "not an S3 event: expected Records, an SNS notification, an EventBridge "
        "S3 event or s3:TestEvent"
    )


def _parse_records(records: Any, depth: int) -> list[ObjectEvent]:
    if not isinstance(records, list):
        raise InvalidEvent("Records must be a list")
    events: list[ObjectEvent] = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise InvalidEvent(f"Records[{index}] is not an object")
        source = record.get("eventSource") or record.get("EventSource")
        if source == "aws:s3":
            events.append(_parse_s3_record(record, index))
        elif source == "aws:sns":
            events.extend(_parse(_field(record, "Sns", "Message", index=index), depth + 1))
        elif source == "aws:sqs":
            events.extend(_parse(_field(record, "body", index=index), depth + 1))
        else:
            raise InvalidEvent(f"Records[{index}] has unknown eventSource {source!r}")
    return events


def _parse_s3_record(record: dict[str, Any], index: int) -> ObjectEvent:
    name = _field(record, "eventName", index=index)
    bucket = _field(record, "s3", "bucket", "name", index=index)
    encoded_key = _field(record, "s3", "object", "key", index=index)
    try:
        key = unquote_plus(encoded_key, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise InvalidEvent(f"Records[{index}].s3.object.key is not valid UTF-8 once decoded") from None
    return ObjectEvent(
        bucket=bucket,
        key=key,
        # A lifecycle expiration deletes the object as DeleteObject does, and
        # EventBridge reports both as "Object Deleted".
        action=_action(
            name,
            created=("ObjectCreated:",),
            removed=("ObjectRemoved:", "LifecycleExpiration:Delete"),
        ),
        name=name,
    )


def _parse_eventbridge(document: dict[str, Any]) -> ObjectEvent:
    name = document["detail-type"]
    if not isinstance(name, str):
        raise InvalidEvent("detail-type must be a string")
    return ObjectEvent(
        bucket=_field(document, "detail", "bucket", "name"),
        # EventBridge sends keys without any encoding.
        key=_field(document, "detail", "object", "key"),
        action=_action(name, created=("Object Created",), removed=("Object Deleted",)),
        name=name,
    )


def _action(name: str, *, created: tuple[str, ...], removed: tuple[str, ...]) -> str:
    if name.startswith(created):
        return CREATED
    if name.startswith(removed):
        return REMOVED
    # Other S3 events (restores, transitions, tagging, ACL changes, ...) change no pixels.
    return f"other:{name}"


def _field(document: dict[str, Any], *path: str, index: int | None = None) -> Any:
    """Read a string at `path`, or raise InvalidEvent naming the missing field."""
    where = f"Records[{index}]." if index is not None else ""
    value: Any = document
    for name in path:
        if not isinstance(value, dict) or name not in value:
            raise InvalidEvent(f"missing field {where}{'.'.join(path)}")
        value = value[name]
    if not isinstance(value, str):
        raise InvalidEvent(f"field {where}{'.'.join(path)} must be a string, got {type(value).__name__}")
    return value


def _load_json(text: str | bytes) -> Any:
    try:
        return json.loads(text)
    except UnicodeDecodeError:
        raise InvalidEvent("document is not valid UTF-8 JSON") from None
    except RecursionError:
        raise InvalidEvent("document is nested too deeply to parse as JSON") from None
    except json.JSONDecodeError as error:
        raise InvalidEvent(f"document is not valid JSON: {error.msg} at position {error.pos}") from None
    except ValueError as error:
        # Python rejects integers of more than 4300 digits with a plain ValueError.
        raise InvalidEvent(f"document is not valid JSON: {error}") from None
