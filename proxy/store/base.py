"""The interface that every store implements."""

import abc
import hashlib
from dataclasses import dataclass
from datetime import datetime


class ObjectTooLarge(Exception):
    """An object is larger than the `max_bytes` its reader accepts; its body was not read."""

    def __init__(self, key: str, size: int) -> None:
        super().__init__(f"{key} is {size} bytes")
        self.key = key
        self.size = size


@dataclass(frozen=True)
class StoredObject:
    key: str
    body: bytes
    content_type: str
    # Quoted hex MD5 of the body, as S3 gives for objects uploaded in one part.
    etag: str
    last_modified: datetime


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    last_modified: datetime


def md5_etag(body: bytes) -> str:
    return '"' + hashlib.md5(body, usedforsecurity=False).hexdigest() + '"'


class Store(abc.ABC):
    """Objects addressed by key, as in S3.

    Every method raises StoreFailed (502) or StoreTimedOut (504) when the store
    fails or cannot be reached. A missing key is not an error: `get` and `head` return None.
    """

    @abc.abstractmethod
    async def get(self, key: str, max_bytes: int | None = None, *, need_etag: bool = True) -> StoredObject | None:
        """Fetch an object with its body, or None if the key does not exist.

        Raises ObjectTooLarge, before reading the body, for an object over `max_bytes`.
        With `need_etag` False, a store that would have to compute the ETag may
        leave it empty.
        """

    @abc.abstractmethod
    async def head(self, key: str) -> ObjectInfo | None:
        """Fetch an object's metadata without its body, or None if it does not exist."""

    @abc.abstractmethod
    async def put(self, key: str, body: bytes, content_type: str, cache_control: str) -> StoredObject:
        """Write an object, replacing any object of the same key."""

    @abc.abstractmethod
    async def list_keys(self, prefix: str) -> list[str]:
        """List every key that starts with `prefix`, in lexicographic order."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Delete an object. Deleting a missing key succeeds."""

    @abc.abstractmethod
    async def check(self) -> None:
        """Raise StoreFailed or StoreTimedOut unless the store is reachable."""

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """Return the store location for logs and messages: `s3://bucket` or a folder."""

    async def close(self) -> None:
        """Release connections. The store is unusable afterwards."""
