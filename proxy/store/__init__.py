"""Stores of sources and variants: an S3 bucket or a local folder."""

from .base import Store, StoredObject
from .local import LocalStore
from .s3 import S3Store

__all__ = ["Store", "StoredObject", "LocalStore", "S3Store"]
