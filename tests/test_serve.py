"""End-to-end tests of `resize-proxy serve` with a real process, real HTTP and moto as S3."""

import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from conftest import FAKE_CREDENTIALS, REPO, decode, free_port

SOURCE_KEY = "original/a/b/photo.jpg"
VARIANT_KEY = "r/a/b/photo-720.jpg"

# Seconds that the server may take to return 200 on /healthz after it is started.
START_TIMEOUT = 30
# Seconds that the server may take to exit after SIGTERM.
STOP_TIMEOUT = 15
# Seconds for one HTTP request to the server, resize included.
REQUEST_TIMEOUT = 30

OPEN_LINE = re.compile(r"^resize-proxy: open (?P<url>.+)$", re.MULTILINE)


class ServerProcess:
    """A `resize-proxy serve` subprocess with its stderr written to a file."""

    def __init__(self, process: subprocess.Popen[bytes], base_url: str, stderr_path: Path) -> None:
        self.process = process
        self.base_url = base_url
        self.stderr_path = stderr_path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_until_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(
                    f"server exited with status {self.process.returncode} before /healthz "
                    f"returned 200; its stderr:\n{self.stderr()}"
                )
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        pytest.fail(
            f"server did not return 200 on /healthz within {START_TIMEOUT} s; its stderr:\n{self.stderr()}"
        )

    def terminate(self) -> int | None:
        """Send SIGTERM and return the exit status, or None if it did not exit in time."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start `resize-proxy serve` on a free port. Every server started is killed at teardown."""
    servers: list[ServerProcess] = []

    def start(cwd: Path, env: dict[str, str], *arguments: str) -> ServerProcess:
        port = free_port()
        stderr_path = tmp_path / f"serve-{port}.stderr"
        with stderr_path.open("wb") as stderr_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "proxy", "serve", "--host", "127.0.0.1", "--port", str(port), *arguments],
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr_file,
            )
        server = ServerProcess(process, f"http://127.0.0.1:{port}", stderr_path)
        servers.append(server)
        server.wait_until_healthy()
        return server

    yield start

    for server in servers:
        server.kill()


def server_env(**proxy_variables: str) -> dict[str, str]:
    """The test's environment without PROXY_* variables, plus `proxy_variables`."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("PROXY_")}
    for name, value in proxy_variables.items():
        env[f"PROXY_{name.upper()}"] = value
    return env


@pytest.fixture
def s3_server_env(moto_endpoint: str, bucket: str) -> dict[str, str]:
    env = server_env(storage=f"s3://{bucket}")
    env.update(FAKE_CREDENTIALS)
    env["AWS_ENDPOINT_URL"] = moto_endpoint
    env.pop("AWS_ENDPOINT_URL_S3", None)
    env.pop("AWS_PROFILE", None)
    return env


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A working folder with a copy of the repository's images/original/, and no variants."""
    folder = tmp_path / "site"
    shutil.copytree(REPO / "images" / "original", folder / "images" / "original")
    return folder


def test_serve_s3_makes_variant(
    start_server, s3_server_env, tmp_path: Path, s3, bucket: str, photo: bytes
) -> None:
    server = start_server(tmp_path, s3_server_env)
    s3.put_object(Bucket=bucket, Key=SOURCE_KEY, Body=photo, ContentType="image/jpeg")

    response = httpx.get(f"{server.base_url}/{VARIANT_KEY}", timeout=REQUEST_TIMEOUT)

    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert decode(response.content).width == 720
    stored = s3.get_object(Bucket=bucket, Key=VARIANT_KEY)
    assert stored["ContentType"] == "image/jpeg"
    assert stored["Body"].read() == response.content


def test_serve_missing_source_returns_404(start_server, s3_server_env, tmp_path: Path) -> None:
    server = start_server(tmp_path, s3_server_env)

    response = httpx.get(f"{server.base_url}/r/a/b/absent-720.jpg", timeout=REQUEST_TIMEOUT)

    assert response.status_code == 404
    assert "original/a/b/absent" in response.text


def test_serve_local_prints_working_url(start_server, site: Path) -> None:
    server = start_server(site, server_env())

    match = OPEN_LINE.search(server.stderr())
    assert match is not None, server.stderr()
    url = match.group("url")
    assert url.startswith(server.base_url + "/r/")
    response = httpx.get(url, timeout=REQUEST_TIMEOUT)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert decode(response.content).width == 720


def test_serve_open_url_quotes_name(start_server, tmp_path: Path, photo: bytes) -> None:
    # A space, `%` and `#` in a file name must be percent-encoded in the URL,
    # or the request names another file or loses its end as a fragment.
    site = tmp_path / "site"
    (site / "images" / "original").mkdir(parents=True)
    (site / "images" / "original" / "50% off #2.jpg").write_bytes(photo)
    server = start_server(site, server_env())

    match = OPEN_LINE.search(server.stderr())
    assert match is not None, server.stderr()
    url = match.group("url")
    assert url == f"{server.base_url}/r/50%25%20off%20%232-720.jpg"
    response = httpx.get(url, timeout=REQUEST_TIMEOUT)
    assert response.status_code == 200
    assert decode(response.content).width == 720


def test_serve_head_matches_get(
    start_server, s3_server_env, tmp_path: Path, s3, bucket: str, photo: bytes
) -> None:
    server = start_server(tmp_path, s3_server_env)
    s3.put_object(Bucket=bucket, Key=SOURCE_KEY, Body=photo, ContentType="image/jpeg")
    url = f"{server.base_url}/{VARIANT_KEY}"

    # The first HEAD makes the variant, and GET and the second HEAD read it back.
    first_head = httpx.head(url, timeout=REQUEST_TIMEOUT)
    get = httpx.get(url, timeout=REQUEST_TIMEOUT)
    second_head = httpx.head(url, timeout=REQUEST_TIMEOUT)

    assert get.status_code == 200
    assert first_head.status_code == 200
    assert second_head.status_code == 200
    assert first_head.content == b""
    assert second_head.content == b""
    assert int(get.headers["content-length"]) == len(get.content)
    assert first_head.headers["content-length"] == get.headers["content-length"]
    assert second_head.headers["content-length"] == get.headers["content-length"]
    assert first_head.headers["etag"] == get.headers["etag"]
    assert second_head.headers["etag"] == get.headers["etag"]
    assert first_head.headers["content-type"] == get.headers["content-type"]


def test_serve_sigterm_exits_0(start_server, s3_server_env, tmp_path: Path) -> None:
    server = start_server(tmp_path, s3_server_env)
    assert httpx.get(f"{server.base_url}/readyz", timeout=REQUEST_TIMEOUT).status_code == 200

    status = server.terminate()

    assert status == 0, server.stderr()
    # The app's shutdown ran, so the store was closed before the exit.
    assert "resize-proxy stopped" in server.stderr()


def test_serve_json_logs_parse(start_server, s3_server_env, tmp_path: Path) -> None:
    server = start_server(tmp_path, {**s3_server_env, "PROXY_LOG_FORMAT": "json"})

    httpx.get(f"{server.base_url}/r/a/b/absent-720.jpg", timeout=REQUEST_TIMEOUT)
    server.terminate()

    # Every line is JSON, the start-up lines included.
    entries = [json.loads(line) for line in server.stderr().splitlines() if line.strip()]
    requests = [entry for entry in entries if entry["logger"] == "proxy.access_log"]
    assert any(entry["message"].startswith("serving s3://") for entry in entries)
    assert requests
    assert "status=404" in requests[-1]["message"]
    assert all(entry["level"] in ("INFO", "WARNING", "ERROR") for entry in entries)


def wait_for_generation(base_url: str) -> None:
    """Wait until the server reports a variant in progress on /metrics."""
    deadline = time.monotonic() + REQUEST_TIMEOUT
    while time.monotonic() < deadline:
        page = httpx.get(f"{base_url}/metrics", timeout=REQUEST_TIMEOUT).text
        if re.search(r"^resize_proxy_generations_in_progress [1-9]", page, re.MULTILINE):
            return
        time.sleep(0.05)
    pytest.fail(f"no variant was in progress within {REQUEST_TIMEOUT} s")


def test_serve_sigterm_finishes_request_in_flight(
    start_server, s3_server_env, tmp_path: Path, s3, bucket: str, photo: bytes
) -> None:
    # A 1200 px AVIF at effort 5 takes a few seconds to encode (2.7 s on an idle
    # 2-core machine), so SIGTERM arrives while the request is in flight, and a
    # loaded machine still finishes it within REQUEST_TIMEOUT. The server must
    # finish it before it exits.
    s3.put_object(Bucket=bucket, Key="original/slow.jpg", Body=photo)
    # The processing deadline is raised so that a slow machine still finishes it.
    environment = {**s3_server_env, "PROXY_AVIF_EFFORT": "5", "PROXY_PROCESSING_TIMEOUT": "300"}
    server = start_server(tmp_path, environment)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(httpx.get, f"{server.base_url}/r/slow-1200.avif", timeout=REQUEST_TIMEOUT)
        wait_for_generation(server.base_url)
        status = server.terminate()
        response = pending.result()

    log = server.stderr()
    # uvicorn logs this only when a connection is still open at shutdown.
    assert "Waiting for connections to close" in log
    assert response.status_code == 200
    assert decode(response.content).width == min(1200, decode(photo).width)
    assert status == 0, log


def test_serve_workers_sigterm_keeps_log_lines(start_server, s3_server_env, tmp_path: Path) -> None:
    server = start_server(tmp_path, s3_server_env, "--workers", "2")
    ids = [f"before-stop-{number}" for number in range(20)]
    for request_id in ids:
        httpx.get(f"{server.base_url}/healthz", headers={"X-Request-ID": request_id}, timeout=REQUEST_TIMEOUT)

    # Sent at once, before the workers' 0.1 s batches are written.
    status = server.terminate()

    log = server.stderr()
    assert status == 0, log
    assert [request_id for request_id in ids if f"request id={request_id} " not in log] == []
    # Each worker's app stopped and wrote its last line.
    assert log.count("resize-proxy stopped") == 2
