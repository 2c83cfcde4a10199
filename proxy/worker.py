"""`resize-proxy worker`: make and delete variants from S3 events queued in SQS.

A message is deleted only after all its records succeeded or were skipped. A
failed message stays in the queue: SQS delivers it again after its visibility
timeout, and the queue's redrive policy moves it to the dead-letter queue after
maxReceiveCount attempts.
"""

import asyncio
import contextlib
import logging
import signal
from typing import Any

import aiohttp
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError

from .events import InvalidEvent
from .settings import Settings
from .store.s3 import aws_session
from .uploads import FAILED, UploadHandler, open_upload_handler

logger = logging.getLogger(__name__)

# SQS returns at most 10 messages per ReceiveMessage call.
MAX_MESSAGES_PER_RECEIVE = 10
# Seconds to wait after a failed ReceiveMessage before the next one.
RECEIVE_RETRY_DELAY = 5.0


class SqsWorker:
    """Poll one queue and handle up to `concurrency` messages at once."""

    def __init__(
        self,
        handler: UploadHandler,
        sqs: Any,
        queue_url: str,
        *,
        concurrency: int,
        wait_seconds: int,
    ) -> None:
        self.handler = handler
        self.sqs = sqs
        self.queue_url = queue_url
        self.concurrency = concurrency
        self.wait_seconds = wait_seconds
        self.stopping = asyncio.Event()
        # Set when the queue became unusable; run_worker then fails with it.
        self.fatal_error: str | None = None
        self._in_flight: set[asyncio.Task[None]] = set()

    def stop(self) -> None:
        """Stop receiving; run() returns once the messages in flight are done."""
        if not self.stopping.is_set():
            logger.info("worker stopping; finishing %d messages in flight", len(self._in_flight))
            self.stopping.set()

    async def run(self) -> None:
        logger.info("worker started queue=%s concurrency=%d", self.queue_url, self.concurrency)
        while not self.stopping.is_set():
            free = self.concurrency - len(self._in_flight)
            if free <= 0:
                await asyncio.wait(self._in_flight, return_when=asyncio.FIRST_COMPLETED)
                continue
            messages = await self._receive(min(free, MAX_MESSAGES_PER_RECEIVE))
            for message in messages:
                task = asyncio.create_task(self._process(message))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)

        if self._in_flight:
            await asyncio.wait(self._in_flight)
        logger.info("worker stopped queue=%s", self.queue_url)

    async def _receive(self, count: int) -> list[dict[str, Any]]:
        """Long-poll for up to `count` messages; return early, with none, on stop."""
        receive = asyncio.ensure_future(
            self.sqs.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=count,
                WaitTimeSeconds=self.wait_seconds,
                AttributeNames=["ApproximateReceiveCount"],
            )
        )
        stopped = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait({receive, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not receive.done():
            # Messages that SQS hands out to a cancelled call become visible again
            # after their visibility timeout, so nothing is lost.
            receive.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await receive
            return []
        try:
            return receive.result().get("Messages", [])
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code in FATAL_CODES:
                # A queue deleted while the worker runs: stop instead of retrying forever.
                logger.error("queue=%s cannot be read (%s); stopping", self.queue_url, code)
                self.fatal_error = f"queue {self.queue_url} cannot be read ({code}); check --queue-url"
                self.stop()
                return []
            return await self._receive_failed(error)
        except (BotoCoreError, aiohttp.ClientError, OSError) as error:
            return await self._receive_failed(error)

    async def _receive_failed(self, error: Exception) -> list[dict[str, Any]]:
        """Log a receive that may work on retry, and wait before the next one."""
        logger.error(
            "receiving from queue=%s failed: %s; retrying in %.0f s",
            self.queue_url,
            error,
            RECEIVE_RETRY_DELAY,
        )
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), RECEIVE_RETRY_DELAY)
        return []

    async def _process(self, message: dict[str, Any]) -> None:
        message_id = message.get("MessageId", "-")
        receive_count = message.get("Attributes", {}).get("ApproximateReceiveCount", "-")
        try:
            outcomes = await self.handler.handle_document(message.get("Body", ""))
        except InvalidEvent as error:
            logger.error(
                "message id=%s receive_count=%s is not an S3 event (%s); left in the "
                "queue for its dead-letter queue",
                message_id,
                receive_count,
                error,
            )
            return
        except Exception:
            # A message that trips a bug is left in the queue like a failed one, and
            # the worker goes on with the others.
            logger.exception(
                "message id=%s receive_count=%s: unexpected error; left in the queue",
                message_id,
                receive_count,
            )
            return

        failed = [outcome for outcome in outcomes if outcome.result == FAILED]
        if failed:
            logger.warning(
                "message id=%s receive_count=%s: %d of %d records failed; left in the "
                "queue for another attempt",
                message_id,
                receive_count,
                len(failed),
                len(outcomes),
            )
            return

        try:
            await self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"])
        except (ClientError, BotoCoreError, aiohttp.ClientError, OSError) as error:
            # The work is done and idempotent: a redelivery repeats it harmlessly.
            logger.error("deleting message id=%s failed: %s", message_id, error)
            return
        logger.info("message id=%s done records=%d", message_id, len(outcomes))


class QueueUnusable(Exception):
    """The queue cannot be read, and retrying will not change that."""


# SQS error codes that retrying cannot fix: the queue is missing or denied.
FATAL_CODES = {
    "AWS.SimpleQueueService.NonExistentQueue",
    "QueueDoesNotExist",
    "AccessDenied",
    "InvalidAddress",
    "InvalidClientTokenId",
}


async def _check_queue(sqs: Any, queue_url: str) -> None:
    """Raise QueueUnusable unless the queue can be read, so a typo stops the worker at once."""
    try:
        await sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "unknown")
        raise QueueUnusable(f"queue {queue_url} cannot be read ({code}); check --queue-url and the credentials") from None
    except (BotoCoreError, aiohttp.ClientError, OSError) as error:
        raise QueueUnusable(f"queue {queue_url} cannot be reached ({error}); check --queue-url and the SQS endpoint") from None


async def run_worker(settings: Settings, queue_url: str, *, concurrency: int, wait_seconds: int) -> None:
    """Run a worker until SIGTERM or SIGINT, then finish the messages in flight."""
    # A long poll keeps the connection open for wait_seconds before SQS responds.
    config = AioConfig(
        connect_timeout=settings.s3_connect_timeout,
        read_timeout=wait_seconds + settings.s3_read_timeout,
        retries={"total_max_attempts": settings.s3_max_attempts, "mode": "standard"},
    )
    session = aws_session()
    async with open_upload_handler(settings) as handler, session.client("sqs", config=config) as sqs:
        await _check_queue(sqs, queue_url)
        worker = SqsWorker(handler, sqs, queue_url, concurrency=concurrency, wait_seconds=wait_seconds)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, worker.stop)
        try:
            await worker.run()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
        if worker.fatal_error:
            raise QueueUnusable(worker.fatal_error)
