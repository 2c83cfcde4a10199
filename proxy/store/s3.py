"""A store in an S3 bucket, reached through aioboto3.

The endpoint, region and credentials come from the standard AWS settings
(`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, ...),
so any S3-compatible server works. One client serves the whole process.
"""

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

import aioboto3
import aiohttp
from aiobotocore.config import AioConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    ReadTimeoutError,
)
from botocore.handlers import add_expect_header

from ..errors import StoreFailed, StoreTimedOut
from .base import ObjectInfo, ObjectTooLarge, Store, StoredObject

logger = logging.getLogger(__name__)

MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


def aws_session() -> aioboto3.Session:
    """Make a session that also takes its region from AWS_REGION.

    botocore 1.40 reads only AWS_DEFAULT_REGION, while AWS SDKs and Lambda set
    AWS_REGION, so an S3 client worked without a region and an SQS client failed.
    """
    return aioboto3.Session(region_name=os.environ.get("AWS_REGION") or None)


class S3Store(Store):
    def __init__(self, client: Any, bucket: str) -> None:
        self._client = client
        self._exit_stack: contextlib.AsyncExitStack | None = None
        self.bucket = bucket

    @classmethod
    async def open(
        cls,
        bucket: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        max_attempts: int,
        max_connections: int = 50,
    ) -> "S3Store":
        config = AioConfig(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # botocore reads `max_attempts` here as the number of retries, so
            # `total_max_attempts`, which counts the first attempt too, is used.
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
            max_pool_connections=max_connections,
        )
        exit_stack = contextlib.AsyncExitStack()
        session = aws_session()
        client = await exit_stack.enter_async_context(session.client("s3", config=config))
        # botocore adds `Expect: 100-continue` to S3 PUT requests with a body, and
        # aiohttp 3.14 starts the read timeout only after the body is sent, so a
        # server that never responded to the headers kept a PUT waiting forever.
        # Without the header the body goes out at once and the read timeout applies.
        client.meta.events.unregister("before-call.s3", add_expect_header)
        store = cls(client, bucket)
        store._exit_stack = exit_stack
        return store

    @property
    def description(self) -> str:
        return f"s3://{self.bucket}"

    async def close(self) -> None:
        if self._exit_stack is not None:
            await self._exit_stack.aclose()
            self._exit_stack = None

    async def get(self, key: str, max_bytes: int | None = None, *, need_etag: bool = True) -> StoredObject | None:
        async with self._translate_errors("GET", key):
            try:
                response = await self._client.get_object(Bucket=self.bucket, Key=key)
            except ClientError as error:
                if _error_code(error) in MISSING_CODES:
                    return None
                raise
            async with response["Body"] as stream:
                # Leaving the block unread closes the connection instead of
                # downloading a body that would be rejected anyway.
                size = response.get("ContentLength", 0)
                if max_bytes is not None and size > max_bytes:
                    raise ObjectTooLarge(key, size)
                body = await stream.read()
        return StoredObject(
            key=key,
            body=body,
            content_type=response.get("ContentType") or "application/octet-stream",
            etag=response.get("ETag", ""),
            last_modified=_utc(response.get("LastModified")),
        )

    async def head(self, key: str) -> ObjectInfo | None:
        async with self._translate_errors("HEAD", key):
            try:
                response = await self._client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as error:
                if _error_code(error) in MISSING_CODES:
                    return None
                raise
        return ObjectInfo(
            key=key,
            size=response.get("ContentLength", 0),
            etag=response.get("ETag", ""),
            last_modified=_utc(response.get("LastModified")),
        )

    async def put(self, key: str, body: bytes, content_type: str, cache_control: str) -> StoredObject:
        # NOTE: aiohttp has no write timeout. A server that accepts the connection
        # and never reads blocks a PUT whose body does not fit in the socket
        # buffers until it closes the connection. On loopback in a test, a 4 MB
        # body still timed out and an 8 MB body blocked.
        async with self._translate_errors("PUT", key):
            response = await self._client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=body,
                ContentType=content_type,
                CacheControl=cache_control,
            )
        return StoredObject(
            key=key,
            body=body,
            content_type=content_type,
            etag=response.get("ETag", ""),
            last_modified=_response_date(response),
        )

    async def list_keys(self, prefix: str) -> list[str]:
        keys: list[str] = []
        async with self._translate_errors("LIST", prefix):
            paginator = self._client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                keys.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(keys)

    async def delete(self, key: str) -> None:
        async with self._translate_errors("DELETE", key):
            await self._client.delete_object(Bucket=self.bucket, Key=key)

    async def check(self) -> None:
        async with self._translate_errors("HEAD", ""):
            await self._client.head_bucket(Bucket=self.bucket)

    @contextlib.asynccontextmanager
    async def _translate_errors(self, operation: str, key: str) -> AsyncIterator[None]:
        """Turn botocore and aiohttp failures into StoreFailed or StoreTimedOut."""
        where = f"s3://{self.bucket}/{key}"
        try:
            yield
        except (ConnectTimeoutError, ReadTimeoutError, asyncio.TimeoutError) as error:
            raise StoreTimedOut(f"S3 {operation} {where} timed out; try again later") from error
        except ClientError as error:
            code = _error_code(error)
            raise StoreFailed(f"S3 {operation} {where} failed with {code}") from error
        except (BotoCoreError, aiohttp.ClientError, OSError) as error:
            raise StoreFailed(
                f"S3 {operation} {where} failed: {type(error).__name__}; check that the "
                "S3 endpoint is reachable"
            ) from error


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", "unknown"))


def _response_date(response: dict[str, Any]) -> datetime:
    """Read the server's Date header of a PUT response.

    The server's clock, not the local one, then dates a variant from its first
    response on, as its LastModified does when it is read back from the store.
    """
    headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    try:
        return parsedate_to_datetime(headers["date"]).astimezone(timezone.utc)
    except (KeyError, TypeError, ValueError):
        return datetime.now(timezone.utc).replace(microsecond=0)


def _utc(value: datetime | None) -> datetime:
    if value is None:
        return datetime.now(timezone.utc).replace(microsecond=0)
    return value.astimezone(timezone.utc)
