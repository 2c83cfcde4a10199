"""Find or make a variant: the memory cache, then the store, then the pipeline."""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TypeVar

from cachetools import LRUCache, TTLCache

from . import imaging
from .errors import NotFound, SourceTooLarge
from .paths import SOURCE_EXTENSIONS, VariantRequest
from .settings import Settings
from .store import Store, StoredObject
from .store.base import md5_etag

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Bytes counted for a memory cache entry besides its body.
ENTRY_OVERHEAD = 512

# Marks a source key that was looked up and not found.
MISSING = ""


@dataclass(frozen=True)
class Variant:
    key: str
    body: bytes
    content_type: str
    etag: str
    last_modified: datetime
    # Layer that served this copy: `memory`, `store` or `generated`.
    layer: str


class VariantService:
    """Serve variants from the memory cache or the store, making missing ones once.

    Concurrent requests for the same missing variant share one generation, so the
    source is fetched once and the variant written once.
    """

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.memory: LRUCache[str, Variant] = LRUCache(
            maxsize=int(settings.memory_cache_mb * 1024 * 1024),
            getsizeof=lambda variant: len(variant.body) + ENTRY_OVERHEAD,
        )
        # Source base (key without extension) to the key found, or MISSING.
        self.source_keys: TTLCache[str, str] = TTLCache(maxsize=100_000, ttl=settings.lookup_ttl or 1e-9)
        self.executor = ThreadPoolExecutor(
            max_workers=settings.thread_count, thread_name_prefix="resize"
        )
        self._in_flight: dict[str, asyncio.Future[Variant]] = {}

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    def forget(self, source_base: str, variant_keys: list[str]) -> None:
        """Drop what is remembered of a source whose variants were made or deleted."""
        self.source_keys.pop(source_base, None)
        for key in variant_keys:
            self.memory.pop(key, None)

    def cached(self, key: str) -> Variant | None:
        variant = self.memory.get(key)
        if variant is None:
            return None
        return Variant(variant.key, variant.body, variant.content_type, variant.etag, variant.last_modified, "memory")

    async def get(self, request: VariantRequest) -> Variant:
        """Return the variant, making and storing it if the store lacks it.

        Raises NotFound when the source is missing, and the pipeline's and the
        store's errors otherwise.
        """
        variant = self.cached(request.key)
        if variant is not None:
            return variant
        return await self._single_flight(request.key, lambda: self._load_or_make(request))

    async def _single_flight(self, key: str, work: Callable[[], Awaitable[Variant]]) -> Variant:
        # The work runs in a task of its own, so a client that disconnects
        # cancels only its own wait, never the result that others wait for.
        task = self._in_flight.get(key)
        if task is None:
            task = asyncio.ensure_future(work())
            self._in_flight[key] = task
            task.add_done_callback(lambda done: self._finish_flight(key, done))
        return await asyncio.shield(task)

    def _finish_flight(self, key: str, task: "asyncio.Future[Variant]") -> None:
        del self._in_flight[key]
        # Marks a failure as retrieved even when every waiter has gone, so asyncio
        # does not report it as never retrieved.
        if not task.cancelled():
            task.exception()

    async def _load_or_make(self, request: VariantRequest) -> Variant:
        stored = await self.store.get(request.key)
        if stored is not None:
            return self._remember(stored, "store")

        source = await self._fetch_source(request)
        max_bytes = self.settings.max_source_mb * 1024 * 1024
        if len(source.body) > max_bytes:
            raise SourceTooLarge(
                f"source {source.key} is {len(source.body)} bytes, over the limit of "
                f"{self.settings.max_source_mb:g} MiB (PROXY_MAX_SOURCE_MB)"
            )
        encoded = await self._run_in_pool(
            imaging.make_variant, source.body, request.width, request.format, self.settings
        )

        stored = await self.store.put(
            request.key, encoded.body, encoded.content_type, self.settings.cache_control
        )
        logger.info(
            "variant made key=%s source=%s width=%d height=%d bytes=%d",
            request.key, source.key, encoded.width, encoded.height, len(encoded.body),
        )
        return self._remember(stored, "generated")

    async def _fetch_source(self, request: VariantRequest) -> StoredObject:
        """Fetch the source, trying the variant's extension before a lookup."""
        base = request.source_base
        known = self.source_keys.get(base)
        if known == MISSING:
            raise NotFound(f"source {base}.* not found")

        first_key = known or f"{base}.{request.ext}"
        source = await self.store.get(first_key)
        if source is not None:
            self.source_keys[base] = first_key
            return source

        # The remembered key may have been deleted or replaced by another extension.
        found_key = await self._find_source_key(base)
        if found_key is not None and found_key != first_key:
            source = await self.store.get(found_key)
        if source is None:
            self.source_keys[base] = MISSING
            raise NotFound(f"source {base}.* not found")
        self.source_keys[base] = found_key
        return source

    async def _find_source_key(self, base: str) -> str | None:
        """Find `<base>.<ext>` with any supported extension in any letter case."""
        prefix = base + "."
        candidates = {}
        for key in await self.store.list_keys(prefix):
            extension = key[len(prefix) :].lower()
            if extension in SOURCE_EXTENSIONS:
                candidates.setdefault(extension, key)
        for extension in SOURCE_EXTENSIONS:
            if extension in candidates:
                return candidates[extension]
        return None

    async def _run_in_pool(self, function: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, function, *args)

    def _remember(self, stored: StoredObject, layer: str) -> Variant:
        variant = Variant(
            key=stored.key,
            body=stored.body,
            content_type=stored.content_type,
            etag=stored.etag or md5_etag(stored.body),
            last_modified=stored.last_modified or datetime.now(timezone.utc),
            layer=layer,
        )
        if self.memory.maxsize > 0:
            try:
                self.memory[variant.key] = variant
            except ValueError:
                # Larger than the whole cache: serve it without caching.
                pass
        return variant
