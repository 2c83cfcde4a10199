"""Prometheus metrics of the process, served at `GET /metrics`.

Each process keeps its own counters, so with `serve --workers N` a scrape returns the
counters of the worker that accepted the connection. Scrape each replica, and run one worker per
container where per-process figures matter.
"""

import threading
from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, Metric
from starlette.requests import Request
from starlette.responses import Response


class ResponseCounters:
    """The counters that every HTTP response adds to, exported as three Prometheus
    counters: requests by route and status, variants by the layer that served
    them, and response body bytes.

    A `prometheus_client.Counter` increment goes through several Python calls;
    three of them took a tenth of a memory-cache hit. Here one call counts a
    response in plain numbers under one lock, and `collect` makes the counter
    families when the registry is scraped.
    """

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self._lock = threading.Lock()
        # Responses by (route, status, layer). `collect` adds them up for each counter.
        self._responses: dict[tuple[str, int, str | None], int] = {}
        self._body_bytes = 0
        registry.register(self)

    def count(self, route: str, status: int, layer: str | None, body_bytes: int) -> None:
        key = (route, status, layer)
        with self._lock:
            self._responses[key] = self._responses.get(key, 0) + 1
            self._body_bytes += body_bytes

    def collect(self) -> Iterator[Metric]:
        requests: dict[tuple[str, int], int] = {}
        served: dict[str, int] = {}
        with self._lock:
            responses = list(self._responses.items())
            body_bytes = self._body_bytes
        for (route, status, layer), count in responses:
            requests[route, status] = requests.get((route, status), 0) + count
            if layer in VARIANT_LAYERS:
                served[layer] = served.get(layer, 0) + count
        family = CounterMetricFamily(
            "resize_proxy_requests_total", "HTTP requests by route and status code.", labels=["route", "status"]
        )
        for (route, status), count in requests.items():
            family.add_metric([route, str(status)], count)
        yield family
        family = CounterMetricFamily(
            "resize_proxy_variants_served_total",
            "Variant responses by the layer that served them: memory, store or generated.",
            labels=["layer"],
        )
        for layer, count in served.items():
            family.add_metric([layer], count)
        yield family
        yield CounterMetricFamily(
            "resize_proxy_response_bytes_total", "Bytes of HTTP response bodies sent.", value=body_bytes
        )


# The layers that serve a variant, each counted in resize_proxy_variants_served_total.
VARIANT_LAYERS = ("memory", "store", "generated")

RESPONSES = ResponseCounters()
GENERATION_SECONDS = Histogram(
    "resize_proxy_generation_seconds",
    "Time to make one variant on request: source fetch, resize and encode, and store write.",
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BYTES_IN = Counter("resize_proxy_source_bytes_total", "Bytes of sources read from the store to make variants.")
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
