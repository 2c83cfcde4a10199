"""Find or make a variant: the memory cache, then the store, then the pipeline."""

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import TypeVar

from cachetools import TTLCache

from . import imaging, metrics
from .errors import NotFound, Overloaded, SourceTooLarge
from .paths import SOURCE_EXTENSIONS, VariantRequest, parse_variant_path
from .settings import Settings
from .store import Store, StoredObject
from .store.base import ObjectTooLarge, md5_etag

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Bytes counted for a memory cache entry besides its body.
ENTRY_OVERHEAD = 512
# Parsed URL paths remembered, because parsing is a large share of a hot hit.
PARSED_PATHS = 10_000


@dataclass(frozen=True)
class Variant:
    key: str
    body: bytes
    content_type: str
    etag: str
    last_modified: datetime
    # Layer that served this copy: `memory`, `store` or `generated`.
    layer: str
    # Response headers of a 200, encoded once for the memory cache's fast path.
    headers: tuple[tuple[bytes, bytes], ...] = ()


class VariantService:
    """Serve variants from the memory cache or the store, making missing ones once.

    Concurrent requests for the same missing variant share one generation, so the
    source is fetched once and the variant written once.
    """

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        # The URL path prefix of variants, read on every memory hit.
        self.url_prefix = settings.variant_url_prefix
        # Entries expire, because another process (a worker, a replica) may
        # replace or delete a variant without this one hearing of it.
        self.memory: TTLCache[str, Variant] = TTLCache(
            maxsize=int(settings.memory_cache_mb * 1024 * 1024),
            ttl=settings.memory_cache_ttl,
            getsizeof=lambda variant: len(variant.body) + ENTRY_OVERHEAD,
        )
        # Source base (key without extension) to the source keys a listing found;
        # an empty tuple records that there was none.
        self.source_keys: TTLCache[str, tuple[str, ...]] = TTLCache(
            maxsize=100_000, ttl=settings.lookup_ttl or 1e-9
        )
        # Number of `supersede` calls. A source listing is kept only if there
        # was none while it ran.
        self._events_seen = 0
        # Variant extension to whether the last source found for it had that
        # extension too, which decides whether a lookup starts with a GET.
        self.own_extension_found: dict[str, bool] = {}
        # Raw URL paths of recent requests and what they parsed to: a plain dict,
        # emptied when full, because an LRU cache's lookup runs several Python
        # calls on every memory hit.
        self.parsed_paths: dict[bytes, VariantRequest] = {}
        self.executor = ThreadPoolExecutor(
            max_workers=settings.thread_count, thread_name_prefix="resize"
        )
        self._variant_flights: dict[str, asyncio.Future[Variant]] = {}
        self._source_flights: dict[str, asyncio.Future[StoredObject]] = {}
        # Generations admitted and not yet finished, at most PROXY_RESIZE_QUEUE.
        self._generations = 0
        # The variant lookups in progress (store read, then making the variant
        # if the store lacks it), each with its source base and whether an
        # event for that source has come in since it started.
        self._in_progress: dict[str, _Lookup] = {}

    def parse(self, raw_path: bytes) -> VariantRequest:
        """Parse a raw variant URL path, remembering the result for the next request.

        Raises what `parse_variant_path` raises. Only valid paths are remembered,
        so a flood of distinct bad paths cannot fill the memory.
        """
        request = self.parsed_paths.get(raw_path)
        if request is None:
            request = parse_variant_path(raw_path, self.settings)
            if len(self.parsed_paths) >= PARSED_PATHS:
                self.parsed_paths.clear()
            self.parsed_paths[raw_path] = request
        return request

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    def supersede(self, source_base: str) -> None:
        """Keep the variant lookups in progress for `source_base` out of the store and the cache.

        An event for the source calls this when it starts and, through
        `forget`, when it ends. A request whose lookup read the earlier source
        or variant still gets that copy, but storing or caching it would
        replace what the event made. Requests from now on look up afresh
        instead of joining those lookups.

        NOTE: only this process's lookups are marked. A lookup in another worker
        or replica can still store a variant read from the earlier source.
        """
        self._events_seen += 1
        for key, lookup in self._in_progress.items():
            if lookup.source_base == source_base:
                lookup.superseded = True
                self._variant_flights.pop(key, None)
        self.source_keys.pop(source_base, None)
        for flight_key in [key for key in self._source_flights if key.startswith(source_base + ".")]:
            del self._source_flights[flight_key]

    def forget(self, source_base: str, variant_keys: list[str]) -> None:
        """Drop what is remembered of a source whose variants were made or deleted."""
        self.supersede(source_base)
        for key in variant_keys:
            self.memory.pop(key, None)

    def cached(self, key: str) -> Variant | None:
        variant = self.memory.get(key)
        if variant is None:
            return None
        return dataclasses.replace(variant, layer="memory")

    async def get(self, request: VariantRequest) -> Variant:
        """Return the variant, making and storing it if the store lacks it.

        Raises NotFound when the source is missing, Overloaded when too many
        variants are being made, and the pipeline's and the store's errors otherwise.
        """
        variant = self.cached(request.key)
        if variant is not None:
            return variant
        return await _single_flight(self._variant_flights, request.key, lambda: self._load_or_make(request))

    async def _load_or_make(self, request: VariantRequest) -> Variant:
        lookup = self._in_progress[request.key] = _Lookup(request.source_base)
        try:
            return await self._load_or_make_once(request, lookup)
        finally:
            # A later lookup of the key may have started after this one was superseded.
            if self._in_progress.get(request.key) is lookup:
                del self._in_progress[request.key]

    async def _load_or_make_once(self, request: VariantRequest, lookup: "_Lookup") -> Variant:
        stored = await self.store.get(request.key)
        if stored is not None:
            if lookup.superseded:
                return self._variant_of(stored, "store")
            return self._remember(stored, "store")

        # Each admitted generation may hold a source and its decoded pixels, so
        # their number is bounded instead of queueing without limit.
        if self._generations >= self.settings.resize_queue:
            raise Overloaded(
                f"{self._generations} variants are being made, the limit of "
                "PROXY_RESIZE_QUEUE; try again in a second"
            )
        self._generations += 1
        metrics.GENERATIONS_IN_PROGRESS.inc()
        started = time.perf_counter()
        try:
            source = await self._fetch_source(request)
            metrics.BYTES_IN.inc(len(source.body))
            encoded = await self._run_in_pool(
                imaging.make_variant, source.body, request.width, request.format, self.settings
            )
            if lookup.superseded:
                logger.info(
                    "variant made but not stored key=%s: an event for its source came in meanwhile",
                    request.key,
                )
                unstored = StoredObject(
                    request.key, encoded.body, encoded.content_type, md5_etag(encoded.body), datetime.now(timezone.utc)
                )
                return self._variant_of(unstored, "generated")
            stored = await self.store.put(
                request.key, encoded.body, encoded.content_type, self.settings.cache_control
            )
            metrics.GENERATION_SECONDS.observe(time.perf_counter() - started)
            if lookup.superseded:
                # The event came in during the write, which may have replaced its
                # variant or followed its deletes. A deleted variant is made again
                # from the current source on the next request.
                logger.info("variant stored and deleted again key=%s: an event for its source came in", request.key)
                await self.store.delete(request.key)
                return self._variant_of(stored, "generated")
        finally:
            self._generations -= 1
            metrics.GENERATIONS_IN_PROGRESS.dec()

        logger.info(
            "variant made key=%s source=%s width=%d height=%d bytes=%d",
            request.key, source.key, encoded.width, encoded.height, len(encoded.body),
        )
        return self._remember(stored, "generated")

    async def _fetch_source(self, request: VariantRequest) -> StoredObject:
        """Fetch the source once for concurrent variants that share it."""
        flight_key = f"{request.source_base}.{request.ext}"
        return await _single_flight(self._source_flights, flight_key, lambda: self._fetch_source_once(request))

    async def _fetch_source_once(self, request: VariantRequest) -> StoredObject:
        base = request.source_base
        own_key = f"{base}.{request.ext}"
        candidates = self.source_keys.get(base)
        if candidates is None:
            # A source with the variant's own extension wins, so one GET of it
            # saves the listing whenever the names match. Where the last source
            # found for this extension had another one, as with `.webp` variants
            # of `.jpg` sources, the GET would miss, and the listing comes first.
            if self.own_extension_found.get(request.ext, True):
                source = await self._get_source(own_key)
                if source is not None:
                    self.own_extension_found[request.ext] = True
                    return source
            events_seen = self._events_seen
            candidates = tuple(await self.store.list_keys(base + "."))
            if self._events_seen == events_seen:
                self.source_keys[base] = candidates

        key = choose_source(candidates, base, request.ext)
        if key is not None:
            self.own_extension_found[request.ext] = key == own_key
        source = await self._get_source(key) if key is not None else None
        if source is None:
            # Listed but deleted since: look again on the next request.
            if key is not None:
                self.source_keys.pop(base, None)
            raise NotFound(f"source {_show(base)}.* not found")
        return source

    async def _get_source(self, key: str) -> StoredObject | None:
        max_bytes = int(self.settings.max_source_mb * 1024 * 1024)
        try:
            return await self.store.get(key, max_bytes=max_bytes, need_etag=False)
        except ObjectTooLarge as error:
            raise SourceTooLarge(
                f"source {_show(key)} is {error.size} bytes, over the limit of "
                f"{self.settings.max_source_mb:g} MiB (PROXY_MAX_SOURCE_MB)"
            ) from None

    async def _run_in_pool(self, function: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, function, *args)

    def _remember(self, stored: StoredObject, layer: str) -> Variant:
        """Make the variant of a stored object and keep it in the memory cache."""
        variant = self._variant_of(stored, layer)
        if self.memory.maxsize > 0:
            try:
                self.memory[variant.key] = variant
            except ValueError:
                # Larger than the whole cache: serve it without caching.
                pass
        return variant

    def _variant_of(self, stored: StoredObject, layer: str) -> Variant:
        etag = stored.etag or md5_etag(stored.body)
        last_modified = stored.last_modified or datetime.now(timezone.utc)
        headers = (
            (b"content-type", stored.content_type.encode("latin-1")),
            (b"content-length", str(len(stored.body)).encode()),
            (b"etag", etag.encode("latin-1")),
            (b"last-modified", format_datetime(last_modified, usegmt=True).encode()),
            (b"cache-control", self.settings.cache_control.encode()),
        )
        return Variant(stored.key, stored.body, stored.content_type, etag, last_modified, layer, headers)


@dataclass
class _Lookup:
    """A variant being read from the store or made on request, and its source base."""

    source_base: str
    superseded: bool = False


def choose_source(keys: Iterable[str], base: str, extension: str) -> str | None:
    """Pick the source of a variant among the keys that start with `<base>.`.

    The first match wins: the variant's extension exactly, then in any letter
    case, then the first of SOURCE_EXTENSIONS present, in any letter case. The
    choice depends only on the keys, so every replica and every request order
    picks the same source.
    """
    prefix = base + "."
    by_extension: dict[str, str] = {}
    for key in sorted(keys):
        suffix = key[len(prefix) :] if key.startswith(prefix) else ""
        if suffix == extension:
            return key
        if suffix.lower() in SOURCE_EXTENSIONS:
            by_extension.setdefault(suffix.lower(), key)
    if extension.lower() in by_extension:
        return by_extension[extension.lower()]
    for candidate in SOURCE_EXTENSIONS:
        if candidate in by_extension:
            return by_extension[candidate]
    return None


async def _single_flight(flights: dict[str, "asyncio.Future[T]"], key: str, work: Callable[[], Awaitable[T]]) -> T:
    """Run `work` once for concurrent callers with the same key.

    The work runs in a task of its own, so a caller that is cancelled, such as a
    client that disconnects, cancels only its own wait.
    """
    task = flights.get(key)
    if task is None:
        task = asyncio.ensure_future(work())
        flights[key] = task
        task.add_done_callback(lambda done: _finish_flight(flights, key, done))
    return await asyncio.shield(task)


def _finish_flight(flights: dict[str, "asyncio.Future[T]"], key: str, task: "asyncio.Future[T]") -> None:
    # The flight may have been dropped already, and another started for the key.
    if flights.get(key) is task:
        del flights[key]
    # Marks a failure as retrieved even when every waiter has gone, so asyncio
    # does not report it as never retrieved.
    if not task.cancelled():
        task.exception()


def _show(text: str) -> str:
    """Shorten a key for an error message."""
    return text if len(text) <= 120 else text[:117] + "..."
