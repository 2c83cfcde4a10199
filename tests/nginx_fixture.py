"""Run the repository's nginx.conf in tests, with test addresses and paths.

    from nginx_fixture import running_nginx

    with running_nginx(["127.0.0.1:8080", "127.0.0.1:8081"], tmp_path / "nginx") as base_url:
        httpx.get(f"{base_url}/r/a/photo-720.jpg")

`nginx_config` rewrites only addresses, paths and, when the tests run as
root, the worker user, so tests exercise the production cache settings.
Everything nginx writes goes into `workdir`: the configuration (`nginx.conf`),
the cache (`CACHE_DIR`), the logs (`ACCESS_LOG`, `ERROR_LOG`, `STDERR_LOG`),
temporary files and the pid file.
"""

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest

from conftest import REPO, free_port

NGINX = Path("/usr/sbin/nginx")
CONFIG = REPO / "nginx.conf"

# URL prefix under which `static_root` is served: `/static/page.html` is the
# file `static_root/page.html`.
STATIC_PREFIX = "/static/"

# Names inside `workdir`.
CACHE_DIR = "cache"
ACCESS_LOG = "access.log"
ERROR_LOG = "error.log"
STDERR_LOG = "nginx.stderr"

# Seconds that nginx may take to respond to HTTP after it is started, and to
# exit after SIGTERM.
START_TIMEOUT = 10
STOP_TIMEOUT = 10

# Content types of static files, because the configuration includes no mime.types.
STATIC_TYPES = {
    "text/html": "html htm",
    "text/css": "css",
    "text/javascript": "js mjs",
    "application/json": "json",
    "image/jpeg": "jpg jpeg",
    "image/png": "png",
    "image/webp": "webp",
    "image/avif": "avif",
    "image/svg+xml": "svg",
}
TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def nginx_config(
    upstreams: Sequence[str], workdir: Path, port: int, static_root: Path | None = None
) -> str:
    """Return the repository's nginx.conf with test addresses and paths.

    The public server listens on 127.0.0.1:`port`, and the `resize_proxy`
    upstream group lists `upstreams` ("127.0.0.1:PORT" each). The cache, logs,
    temporary files and pid file go into `workdir`. With `static_root`, files
    in that folder are served under STATIC_PREFIX. When the tests run as root,
    worker processes run as root too, so they can use pytest's private
    temporary folders. Raises ValueError when nginx.conf no longer has a
    setting that this function rewrites.
    """
    if not upstreams:
        raise ValueError("upstreams is empty; pass at least one 127.0.0.1:PORT")
    for upstream in upstreams:
        if not re.fullmatch(r"127\.0\.0\.1:[0-9]+", upstream):
            raise ValueError(f"upstream {upstream!r} is not 127.0.0.1:PORT")

    text = CONFIG.read_text()
    # Each pattern's first group is kept, and the value follows it.
    text = _replace_once(text, r"^([ \t]*pid[ \t]+)[^;]+", str(workdir / "nginx.pid"))
    text = _replace_once(text, r"^([ \t]*error_log[ \t]+)\S+", str(workdir / ERROR_LOG))
    text = _replace_once(text, r"^([ \t]*access_log[ \t]+)\S+", str(workdir / ACCESS_LOG))
    text = _replace_once(text, r"^([ \t]*proxy_cache_path[ \t]+)\S+", str(workdir / CACHE_DIR))
    temp_paths = "".join(f"    {name}_temp_path {workdir / 'temp' / name};\n" for name in TEMP_PATHS)
    text = _replace_once(text, r"^(http[ \t]*\{\n)", temp_paths)
    text = _replace_upstream_servers(text, upstreams)

    # Only the uncommented `listen` of the public server matches. The internal
    # server in the comments stays as it is.
    listen = f"listen 127.0.0.1:{port};"
    if static_root is not None:
        listen += "\n" + _static_location(static_root)
    text = _replace_once(text, r"^([ \t]*)listen[ \t]+[^;]+;", listen)

    if os.geteuid() == 0:
        text = _replace_once(text, r"^(user[ \t]+)[^;]+", "root")
    return text


@contextlib.contextmanager
def running_nginx(
    upstreams: Sequence[str], workdir: Path, static_root: Path | None = None
) -> Iterator[str]:
    """Run nginx in the foreground with `nginx_config`, and yield its base URL.

    `nginx -t` checks the configuration first. nginx is stopped with SIGTERM
    when the block ends, and killed if it has not exited within STOP_TIMEOUT.
    With `static_root`, `{base_url}/static/NAME` serves `static_root/NAME`.
    Fails the test, never skips it, when /usr/sbin/nginx is missing.
    """
    if not NGINX.exists():
        pytest.fail(
            f"{NGINX} not found; install Debian's nginx package "
            "(scripts/test does so when run as root)"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    for name in TEMP_PATHS:
        (workdir / "temp" / name).mkdir(parents=True, exist_ok=True)
    port = free_port()
    config_path = workdir / "nginx.conf"
    config_path.write_text(nginx_config(upstreams, workdir, port, static_root))
    command = [str(NGINX), "-p", str(workdir), "-c", str(config_path), "-e", "stderr"]

    config_test = subprocess.run(
        [*command, "-t"], check=False, capture_output=True, text=True, timeout=STOP_TIMEOUT
    )
    if config_test.returncode != 0:
        pytest.fail(f"nginx -t rejected {config_path}:\n{config_test.stderr}")

    stderr_path = workdir / STDERR_LOG
    with stderr_path.open("wb") as stderr_file:
        process = subprocess.Popen(
            [*command, "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=stderr_file,
            stderr=stderr_file,
        )
    try:
        base_url = f"http://127.0.0.1:{port}"
        _wait_until_responding(process, base_url, workdir)
        yield base_url
    finally:
        _stop(process)


def _replace_once(text: str, pattern: str, value: str) -> str:
    """Put `value` after the first group of the one match of `pattern`."""
    new_text, count = re.subn(pattern, lambda match: match.group(1) + value, text, flags=re.MULTILINE)
    if count != 1:
        raise ValueError(
            f"expected one match of {pattern!r} in {CONFIG}, found {count}; "
            "update nginx_config to the changed file"
        )
    return new_text


def _replace_upstream_servers(text: str, upstreams: Sequence[str]) -> str:
    block = re.search(r"^[ \t]*upstream[ \t]+resize_proxy[ \t]*\{(?P<body>[^}]*)\}", text, flags=re.MULTILINE)
    if block is None:
        raise ValueError(f"no `upstream resize_proxy` block in {CONFIG}")
    body = block.group("body")
    server_lines = list(re.finditer(r"^(?P<indent>[ \t]*)server[ \t]+[^;]+;\n", body, flags=re.MULTILINE))
    if not server_lines:
        raise ValueError(f"`upstream resize_proxy` in {CONFIG} lists no server")

    # The test servers replace the first `server` line, and the other lines are removed.
    indent = server_lines[0].group("indent")
    servers = "".join(f"{indent}server {upstream};\n" for upstream in upstreams)
    new_body = body[: server_lines[0].start()] + servers
    position = server_lines[0].end()
    for line in server_lines[1:]:
        new_body += body[position : line.start()]
        position = line.end()
    new_body += body[position:]
    return text[: block.start("body")] + new_body + text[block.end("body") :]


def _static_location(static_root: Path) -> str:
    types = " ".join(f"{content_type} {extensions};" for content_type, extensions in STATIC_TYPES.items())
    return (
        f"        location {STATIC_PREFIX} {{\n"
        f"            alias {static_root.resolve()}/;\n"
        f"            types {{ {types} }}\n"
        "        }"
    )


def _wait_until_responding(process: subprocess.Popen[bytes], base_url: str, workdir: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"nginx exited with status {process.returncode} before it responded to HTTP:\n"
                f"{_logs(workdir)}"
            )
        try:
            # Any HTTP response, such as the 404 for `/`, means that nginx is listening.
            httpx.get(f"{base_url}/", timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    pytest.fail(f"nginx did not respond to HTTP within {START_TIMEOUT} s:\n{_logs(workdir)}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(STOP_TIMEOUT)


def _logs(workdir: Path) -> str:
    parts = []
    for name in (STDERR_LOG, ERROR_LOG):
        path = workdir / name
        if path.exists():
            parts.append(f"--- {name}\n{path.read_text(errors='replace')}")
    return "\n".join(parts)
