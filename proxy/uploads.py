"""Upload-event mode: make every variant of an uploaded source, delete them with it.

Every entry point (the HTTP endpoint, `warm`, the SQS worker, the Lambda handler and
`backfill`) goes through `UploadHandler`, and the pixels come from the same pipeline
as on the HTTP path.
"""

import asyncio
import contextlib
import functools
import logging
import re
import time
import unicodedata
from collections.abc import AsyncIterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from . import imaging, metrics
from .errors import ProxyError, SourceTooLarge, StoreFailed
from .events import CREATED, REMOVED, ObjectEvent, parse_document
from .paths import MAX_KEY_BYTES, SOURCE_EXTENSIONS
from .settings import OUTPUT_FORMATS, Settings
from .store import Store, open_store
from .store.base import ObjectTooLarge, StoredObject
from .variants import VariantService, choose_source

T = TypeVar("T")

logger = logging.getLogger(__name__)

# Store requests that one source's variants may have in flight at once.
MAX_PARALLEL_WRITES = 8
# Times a source is made again when it changes while its variants are made.
MAX_ATTEMPTS = 3

MADE = "made"
DELETED = "deleted"
SKIPPED = "skipped"
FAILED = "failed"


@dataclass(frozen=True)
class Outcome:
    key: str
    # MADE, DELETED, SKIPPED or FAILED.
    result: str
    # Variants written or deleted.
    variants: int = 0
    # Why it was skipped or failed.
    reason: str = ""


@dataclass(frozen=True)
class Source:
    """A source key split into the parts that name its variants."""

    key: str
    # The key less the source prefix and the extension: `trips/asia/img_01`.
    stem_path: str

    def variant_key(self, settings: Settings, width: int, output_format: str) -> str:
        return f"{settings.variant_prefix}{self.stem_path}-{width}.{output_format}"


def all_sizes(settings: Settings) -> list[tuple[int, str]]:
    """List every (width, format) pair that upload-event mode makes, widest first."""
    return [(width, fmt) for width in sorted(settings.widths, reverse=True) for fmt in settings.formats]


def source_of(key: str, settings: Settings) -> Source | str:
    """Split a source key, or return the reason it is not a source."""
    if key.startswith(settings.variant_prefix):
        return f"key is under the variant prefix {settings.variant_prefix!r}"
    if not key.startswith(settings.source_prefix):
        return f"key is outside the source prefix {settings.source_prefix!r}"
    relative = key[len(settings.source_prefix) :]
    stem_path, dot, extension = relative.rpartition(".")
    if not dot or extension.lower() not in SOURCE_EXTENSIONS:
        return f"extension of {relative!r} is not a supported image extension"
    segments = stem_path.split("/")
    if any(segment in ("", ".", "..") for segment in segments) or "\\" in key:
        return "key has an empty, '.' or '..' segment or a backslash"
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return "key is not valid UTF-8"
    # Variant URLs with control characters get 400, so such variants could
    # never be served.
    if any(unicodedata.category(char) == "Cc" for char in key):
        return "key contains a control character"
    if not segments[-1] or segments[-1].startswith("."):
        return "file name has no stem before its extension"
    longest_variant = f"{settings.variant_prefix}{stem_path}-{max(settings.widths)}.webp"
    if len(longest_variant.encode("utf-8")) > MAX_KEY_BYTES:
        return f"variant keys would be over the S3 limit of {MAX_KEY_BYTES} bytes"
    return Source(key=key, stem_path=stem_path)


class UploadHandler:
    """Make or delete the variants that object events call for.

    `variants`, when given, is the HTTP service's VariantService, whose memory
    cache and source lookups are updated as variants change.
    """

    def __init__(
        self,
        store: Store,
        settings: Settings,
        executor: Executor,
        variants: VariantService | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.executor = executor
        self.variants = variants
        self._key_locks: dict[str, tuple[asyncio.Lock, int]] = {}

    async def handle_document(self, document: Any) -> list[Outcome]:
        """Handle every event in a document. Raises InvalidEvent for a non-event."""
        return [await self.handle(event) for event in parse_document(document)]

    async def handle(self, event: ObjectEvent) -> Outcome:
        """Handle one event and log one line with its outcome.

        Any failure, unexpected errors included, becomes a FAILED Outcome; only
        cancellation propagates.
        """
        started = time.perf_counter()
        outcome = await self._handle(event)
        duration_ms = (time.perf_counter() - started) * 1000
        metrics.EVENTS.labels(outcome.result).inc()
        level = logging.WARNING if outcome.result == FAILED else logging.INFO
        logger.log(
            level,
            "event %r bucket=%r key=%r result=%s variants=%d duration_ms=%.1f reason=%r",
            event.name,
            event.bucket,
            event.key,
            outcome.result,
            outcome.variants,
            duration_ms,
            outcome.reason or "-",
        )
        return outcome

    async def _handle(self, event: ObjectEvent) -> Outcome:
        # Events of one key run one at a time in this process, so a delete cannot
        # overtake the upload it follows.
        lock, users = self._key_locks.get(event.key, (asyncio.Lock(), 0))
        self._key_locks[event.key] = (lock, users + 1)
        try:
            async with lock:
                return await self._handle_in_order(event)
        except Exception as error:
            logger.exception("unexpected error on event key=%r", event.key)
            return Outcome(event.key, FAILED, reason=f"unexpected {type(error).__name__}")
        finally:
            lock, users = self._key_locks[event.key]
            if users == 1:
                del self._key_locks[event.key]
            else:
                self._key_locks[event.key] = (lock, users - 1)

    async def _handle_in_order(self, event: ObjectEvent) -> Outcome:
        reason = self._skip_reason(event)
        if reason:
            return Outcome(event.key, SKIPPED, reason=reason)
        source = source_of(event.key, self.settings)
        if isinstance(source, str):
            return Outcome(event.key, SKIPPED, reason=source)
        if event.action == CREATED:
            return await self.make(source)
        return await self.delete(source)

    def _skip_reason(self, event: ObjectEvent) -> str:
        if event.action not in (CREATED, REMOVED):
            return f"event {event.name} changes no image"
        # Only the configured bucket is read or written, whatever the event names.
        # A local folder store has no bucket, so the name is not checked there.
        bucket = self.settings.bucket
        if bucket is not None and event.bucket != bucket:
            return f"bucket {event.bucket!r} is not the configured bucket {bucket!r}"
        return ""

    async def make(self, source: Source, sizes: list[tuple[int, str]] | None = None) -> Outcome:
        """Make the variants of `source`: every width × format, or only `sizes`.

        Making every width × format also deletes the source's other stored
        variants, so none keeps showing an earlier upload. A failure becomes an
        Outcome with the reason, so this never raises.
        """
        self._supersede(source)
        try:
            return await self._make(source, sizes or all_sizes(self.settings), replace_all=not sizes)
        except ProxyError as error:
            return Outcome(source.key, FAILED, reason=error.message)
        except Exception as error:
            logger.exception("unexpected error making variants key=%r", source.key)
            return Outcome(source.key, FAILED, reason=f"unexpected {type(error).__name__}")

    async def _make(self, source: Source, sizes: list[tuple[int, str]], *, replace_all: bool) -> Outcome:
        owned, candidates = await self._owned_formats(source)
        if not any(size[1] in owned for size in sizes):
            if replace_all:
                # The source may still own other formats (`png` next to a `jpg`
                # sibling), whose copies made on request show an earlier image.
                await self._delete_variants(source, owned, keep=set())
            base = self.settings.source_prefix + source.stem_path
            chosen = choose_source(candidates, base, sizes[0][1])
            return Outcome(source.key, SKIPPED, reason=f"variants of this name come from {chosen!r}")
        sizes = [size for size in sizes if size[1] in owned]

        # Another process may replace or delete the source while its variants are
        # made. Reading its ETag again afterwards catches that: the variants are
        # then made again, or deleted with it.
        for _ in range(MAX_ATTEMPTS):
            stored = await self._get_source(source)
            if stored is None:
                return Outcome(source.key, SKIPPED, reason="source no longer exists")
            written, skipped = await self._write_variants(source, stored, sizes)
            current = await self.store.head(source.key)
            if current is not None and current.etag == stored.etag:
                break
            if current is None:
                await _gather_bounded([self.store.delete(key) for key in written])
                self._forget(source, written)
                return Outcome(source.key, SKIPPED, reason="source was deleted while its variants were made")
        else:
            raise StoreFailed(f"source {source.key!r} kept changing while its variants were made; try again")

        stale: list[str] = []
        if replace_all:
            # The HTTP path also stores other formats (`png`, `avif`, the `jpeg`
            # spelling) and widths since removed from PROXY_WIDTHS. Those copies
            # show the earlier upload, so they are deleted and made again on request.
            await self._delete_variants(source, owned, keep=set(written))
        self._forget(source, written)
        reason = f"over the side limit of their format, not made: {', '.join(skipped)}" if skipped else ""
        return Outcome(source.key, MADE, variants=len(written), reason=reason)

    async def _delete_variants(self, source: Source, formats: set[str], keep: set[str]) -> list[str]:
        """Delete the stored variants of `source` in `formats`, except the keys in `keep`,
        and drop them from the memory cache. Returns the keys deleted."""
        keys = [
            key for key in await self.existing_variant_keys(source)
            if key not in keep and _extension(key) in formats
        ]
        await _gather_bounded([self.store.delete(key) for key in keys])
        self._forget(source, keys)
        return keys

    async def _get_source(self, source: Source) -> StoredObject | None:
        max_bytes = int(self.settings.max_source_mb * 1024 * 1024)
        try:
            return await self.store.get(source.key, max_bytes=max_bytes)
        except ObjectTooLarge as error:
            raise SourceTooLarge(
                f"source is {error.size} bytes, over the limit of "
                f"{self.settings.max_source_mb:g} MiB (PROXY_MAX_SOURCE_MB)"
            ) from None

    async def _write_variants(
        self, source: Source, stored: StoredObject, sizes: list[tuple[int, str]]
    ) -> tuple[list[str], list[str]]:
        """Make and store the variants; return the keys written and those skipped."""
        loop = asyncio.get_running_loop()
        decode = functools.partial(imaging.decode_source, skip_oversized=True)
        decoded = await loop.run_in_executor(self.executor, decode, stored.body, sizes, self.settings)
        # The encodes share the decoded pixels and run in parallel on the resize
        # threads. The costliest start first, so that the threads end together.
        order = sorted(decoded.sizes, key=_encode_cost, reverse=True)
        encodes = [
            loop.run_in_executor(self.executor, imaging.encode_variant, decoded, width, fmt, self.settings)
            for width, fmt in order
        ]
        encoded = dict(zip(order, await _gather_all(encodes), strict=True))
        images = [encoded.get(size) for size in sizes]

        written, skipped, writes = [], [], []
        for (width, fmt), image in zip(sizes, images, strict=True):
            key = source.variant_key(self.settings, width, fmt)
            if image is None:
                # A tall image may exceed WebP's side limit; its JPEG variants
                # are still made, and the HTTP path returns 422 for the rest.
                skipped.append(key)
                continue
            written.append(key)
            writes.append(self.store.put(key, image.body, image.content_type, self.settings.cache_control))
        try:
            await _gather_bounded(writes)
        except BaseException:
            # Some writes may have replaced their stored variant, so the memory
            # cache must drop its copy of every key written.
            self._forget(source, written)
            raise
        return written, skipped

    async def _owned_formats(self, source: Source) -> tuple[set[str], set[str]]:
        """Return the output extensions whose variants come from this source, and
        the keys of all sources with its stem.

        Sources that share a stem (`photo.jpg`, `photo.png`) share variant keys.
        Each variant comes from the source that the HTTP path picks for it, so
        both paths agree on its pixels, and events of one source leave the
        other's variants alone.
        """
        base = self.settings.source_prefix + source.stem_path
        candidates = {*await self.store.list_keys(base + "."), source.key}
        owned = {ext for ext in OUTPUT_FORMATS if choose_source(candidates, base, ext) == source.key}
        return owned, candidates

    async def delete(self, source: Source) -> Outcome:
        """Delete the stored variants that came from `source`, whatever their width.

        Nothing is deleted while the source key exists, and the Outcome is SKIPPED.
        A failure becomes an Outcome with the reason, so this never raises.
        """
        self._supersede(source)
        try:
            return await self._delete(source)
        except ProxyError as error:
            return Outcome(source.key, FAILED, reason=error.message)
        except Exception as error:
            logger.exception("unexpected error deleting variants key=%r", source.key)
            return Outcome(source.key, FAILED, reason=f"unexpected {type(error).__name__}")

    async def _delete(self, source: Source) -> Outcome:
        # The key can exist again, because a standard SQS queue does not keep order
        # and this event may come after the created event of a new upload. In a
        # versioned bucket, deleting an older version also sends ObjectRemoved:Delete.
        if await self.store.head(source.key) is not None:
            return Outcome(source.key, SKIPPED, reason="source exists again, so its variants stay")
        owned, _ = await self._owned_formats(source)
        keys = await self._delete_variants(source, owned, keep=set())
        return Outcome(source.key, DELETED, variants=len(keys))

    async def existing_variant_keys(self, source: Source) -> list[str]:
        prefix = f"{self.settings.variant_prefix}{source.stem_path}-"
        # `img-800-360.jpg` belongs to the source `img-800`, not to `img`, so
        # only a bare width and a format may follow the prefix.
        pattern = re.compile(r"[0-9]+\.(?:" + "|".join(OUTPUT_FORMATS) + r")")
        return [key for key in await self.store.list_keys(prefix) if pattern.fullmatch(key[len(prefix) :])]

    def _supersede(self, source: Source) -> None:
        # Lookups that requests started before this event may have read the
        # earlier source, so their variants must not replace this event's.
        if self.variants is not None:
            self.variants.supersede(self._source_base(source))

    def _forget(self, source: Source, keys: list[str]) -> None:
        if self.variants is not None:
            self.variants.forget(self._source_base(source), keys)

    def _source_base(self, source: Source) -> str:
        """Return the source's key without its extension, as VariantService names sources."""
        return self.settings.source_prefix + source.stem_path


async def _gather_bounded(operations: list[Any]) -> None:
    """Await store operations, at most MAX_PARALLEL_WRITES at a time.

    Every operation runs to its end even when one fails, so none is left running
    unobserved. The first error is raised after all have ended.
    """
    semaphore = asyncio.Semaphore(MAX_PARALLEL_WRITES)

    async def bounded(operation: Any) -> None:
        async with semaphore:
            await operation

    results = await asyncio.gather(*(bounded(op) for op in operations), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def _gather_all(tasks: list["asyncio.Future[T]"]) -> list[T]:
    """Await every task, even when one fails, and raise the first error after all end.

    The encodes run in threads that cannot be stopped, so waiting for all of them
    keeps a failed upload from leaving work behind that the next one competes with.
    """
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def _encode_cost(size: tuple[int, str]) -> float:
    """Estimate the relative time to encode a variant, to order the encodes."""
    width, output_format = size
    # Measured on a 24-megapixel photo at 2200 px: WebP at effort 2 took about
    # twice as long as JPEG, and AVIF at effort 2 longer still.
    factor = {"jpg": 1.0, "png": 2.0, "webp": 2.5, "avif": 10.0}.get(output_format, 1.0)
    return width * width * factor


@contextlib.asynccontextmanager
async def open_upload_handler(settings: Settings) -> AsyncIterator[UploadHandler]:
    """Open the store and a resize thread pool for a command outside the HTTP service."""
    store = await open_store(settings)
    executor = ThreadPoolExecutor(max_workers=settings.thread_count, thread_name_prefix="resize")
    try:
        yield UploadHandler(store, settings, executor)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        await store.close()


def _extension(key: str) -> str:
    return key.rpartition(".")[2]
