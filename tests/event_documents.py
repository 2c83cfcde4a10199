"""Build S3 event documents in each envelope that AWS delivers them in.

The field sets follow the examples in the AWS documentation for S3 event
notifications, SNS HTTP(S) notifications, Lambda event sources and EventBridge.
"""

import json
from typing import Any, Callable
from urllib.parse import quote_plus

TOPIC_ARN = "arn:aws:sns:us-east-1:123456789012:uploads"
QUEUE_ARN = "arn:aws:sqs:us-east-1:123456789012:uploads"
CONFIRM_URL = f"https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&TopicArn={TOPIC_ARN}&Token=2336"

# Object keys that break a parser which decodes a key twice, never, or with the
# wrong rule: a literal plus, a literal percent, a reserved character, non-ASCII
# letters, and spaces inside a folder name.
AWKWARD_KEYS = ["a+b.jpg", "50%.jpg", "10:47.jpg", "ü.jpg", "trips/my trip/Été 01.jpg"]

S3_EVENT_NAMES = {"created": "ObjectCreated:Put", "removed": "ObjectRemoved:Delete"}
EVENTBRIDGE_DETAIL_TYPES = {"created": "Object Created", "removed": "Object Deleted"}


def encode_key(key: str) -> str:
    """Encode a key as S3 notifications do: form encoding, with `/` left as it is."""
    return quote_plus(key, safe="/")


def s3_record(
    bucket: str, key: str, event_name: str = "ObjectCreated:Put", *, encoded_key: str | None = None
) -> dict[str, Any]:
    """One S3 notification record. `encoded_key` overrides the AWS encoding of `key`."""
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "us-east-1",
        "eventTime": "2026-01-02T03:04:05.678Z",
        "eventName": event_name,
        "userIdentity": {"principalId": "AWS:AIDAEXAMPLE"},
        "requestParameters": {"sourceIPAddress": "192.0.2.10"},
        "responseElements": {"x-amz-request-id": "C3D13FE58DE4C810", "x-amz-id-2": "FMyUVURIY8/IgAtTv8xRjskZ"},
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "variants",
            "bucket": {
                "name": bucket,
                "ownerIdentity": {"principalId": "A3NL1KOZZKExample"},
                "arn": f"arn:aws:s3:::{bucket}",
            },
            "object": {
                "key": encode_key(key) if encoded_key is None else encoded_key,
                "size": 1024,
                "eTag": "d41d8cd98f00b204e9800998ecf8427e",
                "sequencer": "0055AED6DCD90281E5",
            },
        },
    }


def s3_notification(*records: dict[str, Any]) -> dict[str, Any]:
    return {"Records": list(records)}


def sns_notification(message: str) -> dict[str, Any]:
    """An SNS notification as an HTTP(S) subscriber or an SQS queue receives it."""
    return {
        "Type": "Notification",
        "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
        "TopicArn": TOPIC_ARN,
        "Subject": "Amazon S3 Notification",
        "Message": message,
        "Timestamp": "2026-01-02T03:04:06.123Z",
        "SignatureVersion": "1",
        "Signature": "EXAMPLEpH+DcEwjAPg8O9mY8dReBSwksfg2S7WKQcikcNKWLQjwu6A4VbeS0QHVCkhRS7fUQ=",
        "SigningCertURL": "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-0000000000000000000000.pem",
        "UnsubscribeURL": f"https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe&SubscriptionArn={TOPIC_ARN}:0",
    }


def sns_subscription_confirmation() -> dict[str, Any]:
    return {
        "Type": "SubscriptionConfirmation",
        "MessageId": "165545c9-2a5c-472c-8df2-7ff2be2b3b1b",
        "Token": "2336412f37fb687f5d51e6e241d09c805a5a57b30d712f794cc5f6a988666d92",
        "TopicArn": TOPIC_ARN,
        "Message": f"You have chosen to subscribe to the topic {TOPIC_ARN}.",
        "SubscribeURL": CONFIRM_URL,
        "Timestamp": "2026-01-02T03:04:00.000Z",
        "SignatureVersion": "1",
        "Signature": "EXAMPLE",
        "SigningCertURL": "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-0000000000000000000000.pem",
    }


def lambda_sns_records(*messages: str) -> dict[str, Any]:
    """The event that SNS gives a Lambda function: note `EventSource` in capitals."""
    return {
        "Records": [
            {
                "EventSource": "aws:sns",
                "EventVersion": "1.0",
                "EventSubscriptionArn": f"{TOPIC_ARN}:2bcfbf39-05c3-41de-beaa-fcfcc21c8f55",
                "Sns": {**sns_notification(message), "MessageAttributes": {}},
            }
            for message in messages
        ]
    }


def lambda_sqs_records(*bodies: str) -> dict[str, Any]:
    """A batch of SQS messages as Lambda gives it, each body a string."""
    return {
        "Records": [
            {
                "messageId": f"059f36b4-87a3-44ab-83d2-66197574{index:04d}",
                "receiptHandle": "AQEBwJnKyrHigUMZj6rYigCgxlaS3SLy0a",
                "body": body,
                "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": "1767323046123"},
                "messageAttributes": {},
                "md5OfBody": "e4e68fb7bd0e697a0ae8f1bb342846b3",
                "eventSource": "aws:sqs",
                "eventSourceARN": QUEUE_ARN,
                "awsRegion": "us-east-1",
            }
            for index, body in enumerate(bodies)
        ]
    }


def eventbridge_event(bucket: str, key: str, detail_type: str = "Object Created") -> dict[str, Any]:
    """An EventBridge S3 event. Its key is sent as it is, without encoding."""
    return {
        "version": "0",
        "id": "17793124-05d4-b198-2fde-7ededc63b103",
        "detail-type": detail_type,
        "source": "aws.s3",
        "account": "123456789012",
        "time": "2026-01-02T03:04:05Z",
        "region": "us-east-1",
        "resources": [f"arn:aws:s3:::{bucket}"],
        "detail": {
            "version": "0",
            "bucket": {"name": bucket},
            "object": {
                "key": key,
                "size": 1024,
                "etag": "d41d8cd98f00b204e9800998ecf8427e",
                "sequencer": "0055AED6DCD90281E5",
            },
            "request-id": "N4N7GDK58NMKJ12R",
            "requester": "123456789012",
            "source-ip-address": "192.0.2.10",
            "reason": "PutObject" if detail_type == "Object Created" else "DeleteObject",
        },
    }


def s3_text(bucket: str, key: str, action: str) -> str:
    return json.dumps(s3_notification(s3_record(bucket, key, S3_EVENT_NAMES[action])))


# Each envelope turns (bucket, key, action) into the document a receiver gets,
# where `action` is "created" or "removed". An SQS message body contains the same
# text as the HTTP body, so "s3" and "sns" are also the SQS bodies that the worker
# reads from a queue that S3 feeds directly or through SNS.
ENVELOPES: dict[str, Callable[[str, str, str], Any]] = {
    "s3": s3_text,
    "sns": lambda bucket, key, action: json.dumps(sns_notification(s3_text(bucket, key, action))),
    "lambda-sns": lambda bucket, key, action: lambda_sns_records(s3_text(bucket, key, action)),
    "lambda-sqs": lambda bucket, key, action: lambda_sqs_records(s3_text(bucket, key, action)),
    "lambda-sqs-sns": lambda bucket, key, action: lambda_sqs_records(
        json.dumps(sns_notification(s3_text(bucket, key, action)))
    ),
    # EventBridge delivers UTF-8 JSON with the key as it is, so this one is bytes.
    "eventbridge": lambda bucket, key, action: json.dumps(
        eventbridge_event(bucket, key, EVENTBRIDGE_DETAIL_TYPES[action]), ensure_ascii=False
    ).encode("utf-8"),
}
