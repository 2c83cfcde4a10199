"""Real headless Chromium against a real `resize-proxy serve` process, with moto as S3.

The browser is Debian's chromium at /usr/bin/chromium, driven by Playwright.
Playwright's own browser download is never used.
"""

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import FAKE_CREDENTIALS, decode, free_port
from nginx_fixture import STATIC_PREFIX, running_nginx
from playwright.sync_api import BrowserContext, Playwright, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

# Seconds that the server may take to return 200 on /healthz after it is
# started, and to exit after SIGTERM.
START_TIMEOUT = 30
STOP_TIMEOUT = 15
# Milliseconds for one page load or browser action, variants included.
PAGE_TIMEOUT_MS = 60_000

# "2200 × 1237 pixels" in a preview caption.
CAPTION_SIZE = re.compile(r"(?P<width>\d+) × (?P<height>\d+) pixels")

SRCSET_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body { margin: 0; } img { display: block; width: 100%; height: auto; }</style>
</head>
<body>
<img id="photo" alt="" sizes="100vw"
     srcset="/r/p-360.jpg 360w, /r/p-720.jpg 720w, /r/p-1200.jpg 1200w, /r/p-2200.jpg 2200w">
</body>
</html>
"""


@pytest.fixture
def playwright() -> Iterator[Playwright]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} not found; these tests drive Debian's chromium package, "
            "which scripts/test installs when run as root (apt-get install chromium)"
        )
    with sync_playwright() as driver:
        yield driver


@contextlib.contextmanager
def browser_context(
    playwright: Playwright, profiles: Path, width: int, scale: float = 1
) -> Iterator[BrowserContext]:
    """Launch Chromium with a new, empty profile, so no cache is shared between cases."""
    profiles.mkdir(exist_ok=True)
    context = playwright.chromium.launch_persistent_context(
        tempfile.mkdtemp(prefix="profile-", dir=profiles),
        executable_path=str(CHROMIUM),
        headless=True,
        args=CHROMIUM_ARGS,
        viewport={"width": width, "height": 800},
        device_scale_factor=scale,
    )
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    try:
        yield context
    finally:
        context.close()


@pytest.fixture
def proxy_port(moto_endpoint: str, bucket: str, tmp_path: Path) -> Iterator[int]:
    """Run `python -m proxy serve` on a free port against the test's bucket."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("PROXY_")}
    env.update(FAKE_CREDENTIALS)
    env["AWS_ENDPOINT_URL"] = moto_endpoint
    env.pop("AWS_ENDPOINT_URL_S3", None)
    env.pop("AWS_PROFILE", None)
    env["PROXY_STORAGE"] = f"s3://{bucket}"

    port = free_port()
    stderr_path = tmp_path / "serve.stderr"
    with stderr_path.open("wb") as stderr_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr_file,
        )
    try:
        wait_until_healthy(process, f"http://127.0.0.1:{port}", stderr_path)
        yield port
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)


def wait_until_healthy(process: subprocess.Popen[bytes], base_url: str, stderr_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"server exited with status {process.returncode} before /healthz returned 200; "
                f"its stderr:\n{stderr_path.read_text(errors='replace')}"
            )
        try:
            if httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"server did not return 200 on /healthz within {START_TIMEOUT} s")


def test_preview_images_load(playwright, proxy_port, s3, bucket, photo, tmp_path):
    s3.put_object(Bucket=bucket, Key="original/trips/p.jpg", Body=photo)
    base_url = f"http://127.0.0.1:{proxy_port}"

    with browser_context(playwright, tmp_path / "profiles", 1280) as context:
        page = context.new_page()
        failed_requests: list[str] = []
        error_responses: list[str] = []
        console_errors: list[str] = []
        page.on("requestfailed", lambda request: failed_requests.append(f"{request.url}: {request.failure}"))
        page.on(
            "response",
            lambda response: error_responses.append(f"{response.url}: {response.status}")
            if response.status >= 400
            else None,
        )
        page.on(
            "console",
            lambda message: console_errors.append(f"{message.location['url']}: {message.text}")
            if message.type == "error"
            else None,
        )

        response = page.goto(f"{base_url}/preview/original/trips/p.jpg", wait_until="load")
        figures = page.eval_on_selector_all(
            "figure",
            """figures => figures.map(figure => {
                const image = figure.querySelector("img");
                return {
                    src: image.currentSrc,
                    complete: image.complete,
                    naturalWidth: image.naturalWidth,
                    naturalHeight: image.naturalHeight,
                    caption: figure.querySelector("figcaption").textContent,
                };
            })""",
        )

    assert response is not None
    assert response.status == 200
    assert len(figures) == 8
    sources = {figure["src"].removeprefix(base_url) for figure in figures}
    assert sources == {f"/r/trips/p-{width}.{ext}" for width in (360, 720, 1200, 2200) for ext in ("jpg", "webp")}
    for figure in figures:
        listed = CAPTION_SIZE.search(figure["caption"])
        assert listed is not None, figure["caption"]
        assert figure["complete"], figure["src"]
        assert figure["naturalWidth"] > 0, figure["src"]
        assert figure["naturalWidth"] == int(listed["width"]), figure["src"]
        assert figure["naturalHeight"] == int(listed["height"]), figure["src"]
    assert failed_requests == []
    assert error_responses == []
    # A Content-Security-Policy violation would show here.
    assert console_errors == []


@pytest.mark.parametrize(
    ("viewport_width", "scale", "expected_width"),
    [
        # Chromium 156 takes the smallest candidate at least viewport width × scale
        # pixels wide, or the largest when none is. That held for every case tried:
        # widths 320 to 1440 at scales 1, 1.5, 2 and 3.
        (375, 1, 720),
        (375, 2, 1200),
        (1440, 1, 2200),
        (1440, 2, 2200),
    ],
)
def test_srcset_through_nginx_picks_variant(
    playwright, proxy_port, s3, bucket, photo, tmp_path, viewport_width, scale, expected_width
):
    # Each variant must have its own width, so the source may not be narrower than 2200.
    assert decode(photo).width >= 2200
    s3.put_object(Bucket=bucket, Key="original/p.jpg", Body=photo)
    static_root = tmp_path / "static"
    static_root.mkdir()
    (static_root / "srcset.html").write_text(SRCSET_PAGE)

    with (
        running_nginx([f"127.0.0.1:{proxy_port}"], tmp_path / "nginx", static_root) as nginx_url,
        browser_context(playwright, tmp_path / "profiles", viewport_width, scale) as context,
    ):
        page = context.new_page()
        variant_responses = []
        page.on("response", lambda response: variant_responses.append(response) if "/r/" in response.url else None)

        page.goto(f"{nginx_url}{STATIC_PREFIX}srcset.html", wait_until="load")
        # createImageBitmap gives the decoded image's own pixel width.
        image = page.evaluate(
            """async () => {
                const image = document.getElementById("photo");
                const bitmap = await createImageBitmap(image);
                return {
                    currentSrc: image.currentSrc,
                    naturalWidth: image.naturalWidth,
                    pixelWidth: bitmap.width,
                };
            }"""
        )
        bodies = [response.body() for response in variant_responses]

    expected_url = f"{nginx_url}/r/p-{expected_width}.jpg"
    assert image["currentSrc"] == expected_url
    assert [response.url for response in variant_responses] == [expected_url]
    assert variant_responses[0].status == 200
    assert variant_responses[0].headers["content-type"] == "image/jpeg"
    assert decode(bodies[0]).width == expected_width
    assert image["pixelWidth"] == expected_width
    # With `w` descriptors, naturalWidth is the density-corrected width: the
    # image's pixels divided by (descriptor / sizes width). Here that is the
    # viewport width, which Chromium rounds down by up to 1 px.
    assert image["naturalWidth"] >= viewport_width - 1
    assert image["naturalWidth"] <= viewport_width
