"""Prometheus metrics of the process, served at `GET /metrics`.

Each process keeps its own counters, so with `serve --workers N` a scrape returns the
counters of the worker that accepted the connection. Scrape each replica, and run one worker per
container where per-process figures matter.
"""

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.requests import Request
from starlette.responses import Response

REQUESTS = Counter(
    "resize_proxy_requests_total",
    "HTTP requests by route and status code.",
    ["route", "status"],
)
VARIANTS_SERVED = Counter(
    "resize_proxy_variants_served_total",
    "Variant responses by the layer that served them: memory, store or generated.",
    ["layer"],
)
GENERATION_SECONDS = Histogram(
    "resize_proxy_generation_seconds",
    "Time to make one variant on request: source fetch, resize and encode, and store write.",
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BYTES_IN = Counter("resize_proxy_source_bytes_total", "Bytes of sources read from the store to make variants.")
BYTES_OUT = Counter("resize_proxy_response_bytes_total", "Bytes of HTTP response bodies sent.")
GENERATIONS_IN_PROGRESS = Gauge(
    "resize_proxy_generations_in_progress",
    "Variants being made or waiting for a resize thread; past PROXY_RESIZE_QUEUE, requests get 503.",
)
STORE_ERRORS = Counter(
    "resize_proxy_store_errors_total",
    "Requests that failed because of the store, by kind: failed (502) or timeout (504).",
    ["kind"],
)
EVENTS = Counter(
    "resize_proxy_events_total",
    "Upload and delete events by result: made, deleted, skipped or failed.",
    ["result"],
)


# Label children by their labels. `labels()` takes a lock and checks its arguments,
# which took three times as long as the increment itself (3.3 µs against 1.2 µs).
_request_counters: dict[tuple[str, int], Counter] = {}
_served_counters: dict[str, Counter] = {}


def count_request(route: str, status: int) -> None:
    counter = _request_counters.get((route, status))
    if counter is None:
        counter = _request_counters[(route, status)] = REQUESTS.labels(route, str(status))
    counter.inc()


def count_served(layer: str) -> None:
    counter = _served_counters.get(layer)
    if counter is None:
        counter = _served_counters[layer] = VARIANTS_SERVED.labels(layer)
    counter.inc()


def route_of(path: str, variant_prefix: str) -> str:
    """Name the route of a request path with a fixed set of labels, so that
    arbitrary paths cannot create unbounded metric series."""
    if path.startswith("/" + variant_prefix):
        return "variant"
    for route in ("/events/s3", "/healthz", "/readyz", "/metrics"):
        if path == route:
            return route.removeprefix("/")
    if path.startswith("/preview/"):
        return "preview"
    return "other"


async def serve_metrics(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"})
