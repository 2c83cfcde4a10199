"""Stores of sources and variants: an S3 bucket or a local folder."""

from ..settings import Settings
from .base import Store, StoredObject
from .local import LocalStore
from .s3 import S3Store

__all__ = ["Store", "StoredObject", "LocalStore", "S3Store", "open_store"]


async def open_store(settings: Settings) -> Store:
    """Open the store that PROXY_STORAGE names."""
    if settings.bucket is not None:
        return await S3Store.open(
            settings.bucket,
            connect_timeout=settings.s3_connect_timeout,
            read_timeout=settings.s3_read_timeout,
            max_attempts=settings.s3_max_attempts,
            max_connections=max(10, settings.thread_count * 8),
        )
    return LocalStore(settings.storage)
