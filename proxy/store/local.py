"""A store in a local folder, where the key is the file's path below the folder."""

import asyncio
import errno
import mimetypes
import os
import secrets
from datetime import datetime, timezone
from pathlib import Path

from ..errors import InvalidPath, ProxyError, StoreFailed
from .base import ObjectInfo, ObjectTooLarge, Store, StoredObject, md5_etag

mimetypes.add_type("image/webp", ".webp")
mimetypes.add_type("image/avif", ".avif")
mimetypes.add_type("image/heic", ".heic")


# ETags remembered by a local store; the memory is emptied when it is full.
REMEMBERED_ETAGS = 1024


def _signature(status: os.stat_result) -> tuple[int, int, int, int]:
    """Identify a version of a file by its inode, size, and modification and change times.

    NOTE: a file rewritten in place, to the same size, within the kernel's
    timestamp tick (a few milliseconds) keeps its signature. The store's own
    writes replace the file, which gives it a new inode.
    """
    return (status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)


class LocalStore(Store):
    """Files below `root`. Content types follow the file extension.

    Writes go to a temporary file that is renamed into place, so a reader sees the
    old file or the new one, never a partial one.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        # ETags of files read with one, by key and the file's inode, size and
        # times, so that `head` after `get` need not read and hash the file again.
        self._etags: dict[str, tuple[tuple[int, int, int, int], str]] = {}

    @property
    def description(self) -> str:
        return str(self.root)

    async def get(self, key: str, max_bytes: int | None = None, *, need_etag: bool = True) -> StoredObject | None:
        return await asyncio.to_thread(self._get, key, max_bytes, need_etag)

    async def head(self, key: str) -> ObjectInfo | None:
        return await asyncio.to_thread(self._head, key)

    async def put(self, key: str, body: bytes, content_type: str, cache_control: str) -> StoredObject:
        # A local store keeps no metadata, so the content type comes from the extension.
        return await asyncio.to_thread(self._put, key, body)

    async def list_keys(self, prefix: str) -> list[str]:
        return await asyncio.to_thread(self._list_keys, prefix)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._delete, key)

    async def check(self) -> None:
        if not self.root.is_dir():
            raise StoreFailed(f"store folder {self.root} is missing")

    def _path(self, key: str) -> Path:
        # Keys are checked before they get here; this guard keeps a key that
        # slipped through from naming a file outside the root. A NUL byte would
        # make open() raise ValueError, which no caller expects.
        parts = key.split("/")
        unsafe_part = any(part in ("", ".", "..") for part in parts)
        if not key or key.startswith("/") or "\x00" in key or unsafe_part:
            raise StoreFailed(f"key {key!r} cannot name a file in a local store")
        return self.root.joinpath(*parts)

    def _get(self, key: str, max_bytes: int | None = None, need_etag: bool = True) -> StoredObject | None:
        path = self._path(key)
        try:
            with path.open("rb") as file:
                status = os.fstat(file.fileno())
                if max_bytes is not None and status.st_size > max_bytes:
                    raise ObjectTooLarge(key, status.st_size)
                body = file.read()
                mtime = status.st_mtime
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as error:
            raise _failure("reading", key, error) from error
        # The MD5 of a 16 MB photo took 54 ms, which a source read only to be
        # resized does not need.
        etag = ""
        if need_etag:
            etag = md5_etag(body)
            self._remember_etag(key, status, etag)
        return StoredObject(key, body, _content_type(key), etag, _timestamp(mtime))

    def _head(self, key: str) -> ObjectInfo | None:
        # An upload reads the source's ETag before its variants are made and
        # again afterwards; the second time the file is usually unchanged.
        try:
            status = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as error:
            raise _failure("reading", key, error) from error
        remembered = self._etags.get(key)
        if remembered is not None and remembered[0] == _signature(status):
            return ObjectInfo(key, status.st_size, remembered[1], _timestamp(status.st_mtime))
        stored = self._get(key)
        if stored is None:
            return None
        return ObjectInfo(key, len(stored.body), stored.etag, stored.last_modified)

    def _remember_etag(self, key: str, status: os.stat_result, etag: str) -> None:
        if len(self._etags) >= REMEMBERED_ETAGS:
            self._etags.clear()
        self._etags[key] = (_signature(status), etag)

    def _put(self, key: str, body: bytes) -> StoredObject:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # tempfile.mkstemp would create the file with mode 0o600. Mode 0o666 here
            # is reduced by the umask, as for any file that open() creates.
            temporary = path.parent / f".tmp-{secrets.token_hex(8)}"
            handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                with os.fdopen(handle, "wb") as file:
                    file.write(body)
                os.replace(temporary, path)
            except BaseException:
                os.unlink(temporary)
                raise
            status = path.stat()
        except OSError as error:
            raise _failure("writing", key, error) from error
        etag = md5_etag(body)
        self._remember_etag(key, status, etag)
        return StoredObject(key, body, _content_type(key), etag, _timestamp(status.st_mtime))

    def _list_keys(self, prefix: str) -> list[str]:
        # Walk only the deepest folder that the prefix names in full.
        folder_key, _, _ = prefix.rpartition("/")
        unsafe_part = any(part in ("", ".", "..") for part in folder_key.split("/"))
        if "\x00" in prefix or (folder_key and unsafe_part):
            # No stored key has such a segment or a NUL byte, and walking the
            # folder could leave the root.
            return []
        start = self.root.joinpath(*folder_key.split("/")) if folder_key else self.root
        keys = []
        for directory, subdirectories, files in os.walk(start):
            relative = Path(directory).relative_to(self.root).as_posix()
            base = "" if relative == "." else relative + "/"
            # Descend only into folders that can hold a matching key.
            subdirectories[:] = [
                name for name in subdirectories
                if (base + name + "/").startswith(prefix) or prefix.startswith(base + name + "/")
            ]
            for name in files:
                key = base + name
                if key.startswith(prefix) and not name.startswith(".tmp-"):
                    keys.append(key)
        return sorted(keys)

    def _delete(self, key: str) -> None:
        path = self._path(key)
        self._etags.pop(key, None)
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            raise _failure("deleting", key, error) from error


def _content_type(key: str) -> str:
    # guess_type reads a path as a URL, so a key such as `data:photo.jpg` would be
    # taken for a data URL. A leading '/' leaves no URL scheme to find.
    content_type, _ = mimetypes.guess_type("/" + key, strict=False)
    return content_type or "application/octet-stream"


def _timestamp(mtime: float) -> datetime:
    return datetime.fromtimestamp(int(mtime), tz=timezone.utc)


def _failure(operation: str, key: str, error: OSError) -> ProxyError:
    """Describe a failed file operation by its key, never by the server's file path."""
    if error.errno == errno.ENAMETOOLONG:
        return InvalidPath(f"a folder or file name in {key[:80]!r}... is too long for the local store; shorten it")
    return StoreFailed(f"{operation} {key!r} in the local store failed: {error.strerror}")
