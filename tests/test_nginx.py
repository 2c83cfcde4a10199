"""The repository's nginx.conf, run by the real nginx in front of real replicas.

Most tests put nginx in front of two `resize-proxy serve` processes that share
one moto S3 bucket. A few put it in front of a small HTTP server that records
what nginx sends, to see the exact upstream request line and headers.
"""

import http.server
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Self

import httpx
import pytest

import nginx_fixture
from conftest import FAKE_CREDENTIALS, decode, free_port
from nginx_fixture import CACHE_DIR, STATIC_PREFIX, running_nginx
from test_serve import REQUEST_TIMEOUT, STOP_TIMEOUT, ServerProcess, server_env

SOURCE_KEY = "original/a/b/photo.jpg"
VARIANT_PATH = "/r/a/b/photo-720.jpg"
VARIANT_KEY = "r/a/b/photo-720.jpg"
YEAR = 31536000
EVENT_TOKEN = "nginx-test-token"
CONCURRENT_REQUESTS = 20
# Seconds to wait for a replica's log line of a request whose response the
# client already has. A replica logs a request after it sends the response.
LOG_WAIT = 5


@pytest.fixture
def replicas(tmp_path: Path, moto_endpoint: str, bucket: str) -> Iterator[list[ServerProcess]]:
    """Two `resize-proxy serve` processes on one bucket, with the event endpoint on."""
    env = server_env(storage=f"s3://{bucket}", event_token=EVENT_TOKEN)
    env.update(FAKE_CREDENTIALS)
    env["AWS_ENDPOINT_URL"] = moto_endpoint
    env.pop("AWS_ENDPOINT_URL_S3", None)
    env.pop("AWS_PROFILE", None)

    started: list[ServerProcess] = []
    try:
        for _ in range(2):
            started.append(_start_replica(tmp_path, env))
        for replica in started:
            replica.wait_until_healthy()
        yield started
    finally:
        # SIGTERM to all first, so the replicas shut down at the same time.
        for replica in started:
            replica.process.send_signal(signal.SIGTERM)
        for replica in started:
            try:
                replica.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                replica.kill()


@pytest.fixture
def edge(replicas: list[ServerProcess], tmp_path: Path) -> Iterator[str]:
    """Base URL of nginx in front of both replicas."""
    upstreams = [replica.base_url.removeprefix("http://") for replica in replicas]
    with running_nginx(upstreams, tmp_path / "nginx") as base_url:
        yield base_url


@pytest.fixture
def source(s3, bucket: str, photo: bytes) -> str:
    s3.put_object(Bucket=bucket, Key=SOURCE_KEY, Body=photo, ContentType="image/jpeg")
    return SOURCE_KEY


def _start_replica(tmp_path: Path, env: dict[str, str]) -> ServerProcess:
    port = free_port()
    stderr_path = tmp_path / f"replica-{port}.stderr"
    with stderr_path.open("wb") as stderr_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr_file,
        )
    return ServerProcess(process, f"http://127.0.0.1:{port}", stderr_path)


def access_lines(
    replicas: list[ServerProcess], *, path: str | None = None, request_id: str | None = None
) -> list[str]:
    """Return the replicas' access log lines of requests to `path` or with `request_id`.

    Waits up to LOG_WAIT seconds for a first line, because a replica logs a
    request after it sends the response.
    """
    id_pattern = re.escape(request_id) if request_id else r"\S+"
    path_pattern = re.escape(path) if path else r"\S+"
    pattern = re.compile(rf"proxy\.access_log request id={id_pattern} method=\S+ path={path_pattern} ")
    deadline = time.monotonic() + LOG_WAIT
    while True:
        lines = [
            line for replica in replicas for line in replica.stderr().splitlines() if pattern.search(line)
        ]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def variants_made(replica: ServerProcess, key: str) -> int:
    """Count the replica's `variant made` lines for `key`. The replica writes its
    lines in order, in batches, so call this once its access line is there."""
    return len(re.findall(rf"variant made key={re.escape(key)} ", replica.stderr()))


def cache_lifetime(nginx_dir: Path, key: str) -> int:
    """Seconds that nginx keeps the cache entry of `key`, read from its file.

    nginx 1.22 starts each cache file with ngx_http_file_cache_header_t, version
    5: on 64-bit Linux, eight-byte version, valid_sec, updating_sec,
    error_sec, last_modified and date. The key follows as "\\nKEY: <key>\\n".
    valid_sec minus date is the lifetime given when the entry was stored.
    """
    marker = f"\nKEY: {key}\n".encode()
    files = [path for path in (nginx_dir / CACHE_DIR).rglob("*") if path.is_file()]
    entries = [path for path in files if marker in path.read_bytes()]
    assert len(entries) == 1, f"expected one cache file for {key!r}, found {entries}"
    version, valid_sec, _, _, _, date = struct.unpack_from("<Q5q", entries[0].read_bytes())
    assert version == 5, f"cache file header has version {version}, but this reader handles only version 5"
    return valid_sec - date


def test_nginx_second_request_hits(edge: str, replicas, source: str, tmp_path: Path) -> None:
    first = httpx.get(f"{edge}{VARIANT_PATH}", timeout=REQUEST_TIMEOUT)
    second = httpx.get(f"{edge}{VARIANT_PATH}", timeout=REQUEST_TIMEOUT)

    assert first.status_code == 200
    assert first.headers["x-cache-status"] == "MISS"
    assert second.status_code == 200
    assert second.headers["x-cache-status"] == "HIT"
    assert second.content == first.content
    assert decode(second.content).width == 720
    assert second.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert cache_lifetime(tmp_path / "nginx", VARIANT_PATH) == YEAR
    assert len(access_lines(replicas, path=VARIANT_PATH)) == 1


def test_nginx_query_string_hits(edge: str, replicas, source: str) -> None:
    # The first request has a query string too: it makes the entry that the
    # plain path and other query strings then hit.
    first = httpx.get(f"{edge}{VARIANT_PATH}?v=1", timeout=REQUEST_TIMEOUT)
    plain = httpx.get(f"{edge}{VARIANT_PATH}", timeout=REQUEST_TIMEOUT)
    other_query = httpx.get(f"{edge}{VARIANT_PATH}?a=1&b", timeout=REQUEST_TIMEOUT)

    assert first.status_code == 200
    assert first.headers["x-cache-status"] == "MISS"
    assert plain.headers["x-cache-status"] == "HIT"
    assert other_query.headers["x-cache-status"] == "HIT"
    assert other_query.content == first.content
    assert len(access_lines(replicas, path=VARIANT_PATH)) == 1


def test_nginx_concurrent_misses_make_one(edge: str, replicas, source: str, s3, bucket: str) -> None:
    # With versioning on, every PUT of the variant adds a version.
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    start = threading.Barrier(CONCURRENT_REQUESTS)

    def fetch(_: int) -> httpx.Response:
        start.wait(REQUEST_TIMEOUT)
        return httpx.get(f"{edge}{VARIANT_PATH}", timeout=REQUEST_TIMEOUT)

    with ThreadPoolExecutor(CONCURRENT_REQUESTS) as pool:
        responses = list(pool.map(fetch, range(CONCURRENT_REQUESTS)))

    assert [response.status_code for response in responses] == [200] * CONCURRENT_REQUESTS
    assert len({response.content for response in responses}) == 1
    assert [response.headers["x-cache-status"] for response in responses].count("MISS") == 1
    assert len(access_lines(replicas, path=VARIANT_PATH)) == 1
    # The access line is written after `variant made`, so that line is there too.
    assert sum(variants_made(replica, VARIANT_KEY) for replica in replicas) == 1
    versions = s3.list_object_versions(Bucket=bucket, Prefix=VARIANT_KEY).get("Versions", [])
    assert len(versions) == 1


def test_nginx_replicas_share_variants(edge: str, replicas, source: str) -> None:
    through_edge = httpx.get(f"{edge}{VARIANT_PATH}", timeout=REQUEST_TIMEOUT)
    access_lines(replicas, path=VARIANT_PATH)
    # The replica logs `variant made` before its access line, so the line is there.
    makers = [replica for replica in replicas if variants_made(replica, VARIANT_KEY) == 1]
    assert len(makers) == 1, [replica.stderr() for replica in replicas]
    other = next(replica for replica in replicas if replica is not makers[0])

    direct = httpx.get(f"{other.base_url}{VARIANT_PATH}", timeout=REQUEST_TIMEOUT)

    assert through_edge.status_code == 200
    assert direct.status_code == 200
    assert direct.content == through_edge.content
    other_lines = access_lines([other], path=VARIANT_PATH)
    assert len(other_lines) == 1
    assert "layer=store" in other_lines[0]
    assert variants_made(other, VARIANT_KEY) == 0


def test_nginx_bad_path_keeps_own_entry(edge: str, replicas, source: str) -> None:
    # The proxy rejects the empty segment with 400, which carries a cacheable
    # Cache-Control. Were slashes merged into the key, that 400 would be
    # served for the valid path too.
    doubled = "/r/a//b/photo-720.jpg"

    rejected = httpx.get(f"{edge}{doubled}", timeout=REQUEST_TIMEOUT)
    valid = httpx.get(f"{edge}{VARIANT_PATH}", timeout=REQUEST_TIMEOUT)

    assert rejected.status_code == 400
    assert valid.status_code == 200
    assert valid.headers["x-cache-status"] == "MISS"
    assert len(access_lines(replicas, path=doubled)) == 1


def test_nginx_404_cached_for_a_minute(edge: str, replicas, tmp_path: Path) -> None:
    path = "/r/a/b/absent-720.jpg"

    first = httpx.get(f"{edge}{path}", timeout=REQUEST_TIMEOUT)
    second = httpx.get(f"{edge}{path}", timeout=REQUEST_TIMEOUT)

    assert first.status_code == 404
    assert first.headers["x-cache-status"] == "MISS"
    assert second.status_code == 404
    assert second.headers["x-cache-status"] == "HIT"
    assert second.headers["cache-control"] == "public, max-age=60"
    assert cache_lifetime(tmp_path / "nginx", path) == 60
    assert len(access_lines(replicas, path=path)) == 1


def test_nginx_other_methods_get_405(edge: str, replicas, source: str) -> None:
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        response = httpx.request(method, f"{edge}{VARIANT_PATH}", content=b"x", timeout=REQUEST_TIMEOUT)

        assert response.status_code == 405, method
        assert response.headers["allow"] == "GET, HEAD", method
        assert response.headers["content-type"] == "text/plain", method
    head = httpx.head(f"{edge}{VARIANT_PATH}", timeout=REQUEST_TIMEOUT)
    assert head.status_code == 200
    assert head.content == b""
    # Only the HEAD reached a replica, as a GET: nginx caches whole responses.
    lines = access_lines(replicas, path=VARIANT_PATH)
    assert [re.search(r"method=(\S+)", line).group(1) for line in lines] == ["GET"]


def test_nginx_hides_event_endpoint(edge: str, replicas) -> None:
    test_event = b'{"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "b"}'
    headers = {"Authorization": f"Bearer {EVENT_TOKEN}"}
    # Paths that nginx decodes or normalizes to /events/s3, or that the proxy would.
    paths = ["/events/s3", "/events/s3/", "//events/s3", "/events%2Fs3", "/r/%2e%2e/events/s3"]

    direct = httpx.post(f"{replicas[0].base_url}/events/s3", content=test_event, headers=headers)
    posts = [httpx.post(f"{edge}{path}", content=test_event, headers=headers) for path in paths]
    gets = [httpx.get(f"{edge}{path}", headers=headers) for path in paths]

    assert direct.status_code == 200
    assert [response.status_code for response in posts] == [405] * len(paths)
    assert [response.status_code for response in gets] == [404] * len(paths)
    direct_lines = access_lines(replicas, request_id=direct.headers["x-request-id"])
    assert len(direct_lines) == 1
    assert "layer=event" in direct_lines[0]
    # Only the direct POST reached a replica.
    event_lines = [
        line
        for replica in replicas
        for line in replica.stderr().splitlines()
        if re.search(r"proxy\.access_log request .* path=\S*events", line)
    ]
    assert event_lines == direct_lines


def test_nginx_health_checks_not_cached(edge: str, replicas) -> None:
    first = httpx.get(f"{edge}/healthz", timeout=REQUEST_TIMEOUT)
    second = httpx.get(f"{edge}/healthz", timeout=REQUEST_TIMEOUT)
    ready = httpx.get(f"{edge}/readyz", timeout=REQUEST_TIMEOUT)

    assert first.status_code == 200
    assert second.status_code == 200
    assert ready.status_code == 200
    assert "x-cache-status" not in second.headers
    assert second.headers["cache-control"] == "no-store"
    # nginx sends its request id upstream, so each request has a replica's line.
    assert len(access_lines(replicas, request_id=first.headers["x-request-id"])) == 1
    assert len(access_lines(replicas, request_id=second.headers["x-request-id"])) == 1
    assert len(access_lines(replicas, request_id=ready.headers["x-request-id"])) == 1


def test_nginx_request_id_reaches_replica(edge: str, replicas, source: str) -> None:
    miss = httpx.get(f"{edge}{VARIANT_PATH}", timeout=REQUEST_TIMEOUT)
    hit = httpx.get(f"{edge}{VARIANT_PATH}", timeout=REQUEST_TIMEOUT)

    lines = access_lines(replicas, path=VARIANT_PATH)
    assert len(lines) == 1
    assert f"request id={miss.headers['x-request-id']} " in lines[0]
    # A hit carries its own id, not the one stored with the cached response.
    assert hit.headers["x-cache-status"] == "HIT"
    assert hit.headers["x-request-id"] != miss.headers["x-request-id"]


class RecordingUpstream:
    """An HTTP server on 127.0.0.1 that records each request line and headers.

    It returns `status` with `cache_control` and a 5-byte body for every GET.
    """

    def __init__(self, status: int, cache_control: str) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        recording = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                recording.requests.append((self.requestline, dict(self.headers)))
                self.send_response(status)
                self.send_header("Cache-Control", cache_control)
                self.send_header("Content-Length", "5")
                self.end_headers()
                self.wfile.write(b"body\n")

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Self:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_nginx_sends_raw_path_upstream(tmp_path: Path) -> None:
    # Percent-encoding and the double slash stay as sent, and the query string is dropped.
    path = "/r/a//b%2Dc%20d-720.jpg"

    with (
        RecordingUpstream(200, "public, max-age=31536000, immutable") as upstream,
        running_nginx([upstream.address], tmp_path / "nginx") as base_url,
    ):
        response = httpx.get(f"{base_url}{path}?width=1", timeout=REQUEST_TIMEOUT)

    assert response.status_code == 200
    assert len(upstream.requests) == 1
    request_line, headers = upstream.requests[0]
    assert request_line == f"GET {path} HTTP/1.1"
    assert headers["X-Request-ID"] == response.headers["x-request-id"]


def test_nginx_5xx_not_cached(tmp_path: Path) -> None:
    # The proxy's 502 carries the same `max-age=60` as its 4xx responses.
    with (
        RecordingUpstream(502, "public, max-age=60") as upstream,
        running_nginx([upstream.address], tmp_path / "nginx") as base_url,
    ):
        first = httpx.get(f"{base_url}{VARIANT_PATH}", timeout=REQUEST_TIMEOUT)
        second = httpx.get(f"{base_url}{VARIANT_PATH}", timeout=REQUEST_TIMEOUT)

    assert first.status_code == 502
    assert second.status_code == 502
    assert second.headers["x-cache-status"] == "MISS"
    assert len(upstream.requests) == 2
    assert [path for path in (tmp_path / "nginx" / CACHE_DIR).rglob("*") if path.is_file()] == []


def test_running_nginx_serves_static_root(tmp_path: Path) -> None:
    static_root = tmp_path / "static"
    static_root.mkdir()
    (static_root / "page.html").write_text("<!doctype html><title>edge</title>\n")

    with (
        RecordingUpstream(200, "no-store") as upstream,
        running_nginx([upstream.address], tmp_path / "nginx", static_root=static_root) as base_url,
    ):
        response = httpx.get(f"{base_url}{STATIC_PREFIX}page.html", timeout=REQUEST_TIMEOUT)

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html"
    assert response.text == "<!doctype html><title>edge</title>\n"
    assert upstream.requests == []


def test_running_nginx_without_binary_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nginx_fixture, "NGINX", tmp_path / "no-nginx")

    with (
        pytest.raises(pytest.fail.Exception, match="no-nginx not found"),
        running_nginx(["127.0.0.1:9"], tmp_path / "nginx"),
    ):
        pass
