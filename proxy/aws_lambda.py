"""AWS Lambda entry point, `proxy.aws_lambda:handler`.

It takes S3 events delivered directly (or through SNS or EventBridge) and batches
of SQS messages. For SQS it reports each failed message in `batchItemFailures`,
which needs ReportBatchItemFailures on the event source mapping; SQS then delivers
only those again. For other events a failure raises, so Lambda retries the event.
"""

import asyncio
import logging
from typing import Any

from .events import InvalidEvent
from .settings import Settings, load_settings
from .uploads import FAILED, open_upload_handler

logger = logging.getLogger(__name__)

_settings: Settings | None = None


class RecordsFailed(RuntimeError):
    """Some records of a directly delivered event failed; Lambda retries the event."""


def handler(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    global _settings
    # Settings are read once per Lambda container, and a bad one fails every call.
    if _settings is None:
        _settings = load_settings()
        _set_log_levels(_settings)
    return asyncio.run(_handle(event, _settings))


def _set_log_levels(settings: Settings) -> None:
    # The Lambda runtime installs the root handler, so only levels are set here.
    logging.getLogger().setLevel(settings.log_level)
    # libvips logs every thumbnail step at INFO, which `resize-proxy` hides too.
    for name in ("pyvips", "botocore", "aiobotocore"):
        logging.getLogger(name).setLevel(logging.WARNING)


async def _handle(event: dict[str, Any], settings: Settings) -> dict[str, Any]:
    async with open_upload_handler(settings) as uploads:
        records = event.get("Records") if isinstance(event, dict) else None
        if records and all(isinstance(r, dict) and r.get("eventSource") == "aws:sqs" for r in records):
            failed_ids = await _failed_messages(uploads, records)
            return {"batchItemFailures": [{"itemIdentifier": message_id} for message_id in failed_ids]}

        outcomes = await uploads.handle_document(event)
        failed = [outcome for outcome in outcomes if outcome.result == FAILED]
        if failed:
            reasons = "; ".join(f"{outcome.key}: {outcome.reason}" for outcome in failed)
            raise RecordsFailed(f"{len(failed)} of {len(outcomes)} records failed: {reasons}")
        return {"records": len(outcomes), "failed": 0}


async def _failed_messages(uploads: Any, records: list[dict[str, Any]]) -> list[str]:
    failed_ids = []
    for record in records:
        message_id = record.get("messageId", "")
        try:
            outcomes = await uploads.handle_document(record.get("body", ""))
        except InvalidEvent as error:
            logger.error("message id=%s is not an S3 event: %s", message_id, error)
            failed_ids.append(message_id)
            continue
        except Exception:
            # One message that trips a bug must not fail the whole batch.
            logger.exception("message id=%s: unexpected error; reported as failed", message_id)
            failed_ids.append(message_id)
            continue
        if any(outcome.result == FAILED for outcome in outcomes):
            failed_ids.append(message_id)
    return failed_ids
