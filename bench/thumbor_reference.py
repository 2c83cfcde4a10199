"""Thumbor as a reference server for the benchmarks: install it, run it, build its URLs.

Thumbor 7 lives in a virtual environment of its own, because its dependencies clash
with the project's. `running_thumbor` serves the files of one folder with thumbor's
file loader, with no source storage and no result storage, so every request loads,
resizes and encodes. `thumbor_path` gives the URL path for one variant: a width, the
height following the aspect ratio, never enlarged, in JPEG or WebP.

The smoke test installs thumbor (once, into ~/.cache/resize-proxy-bench/thumbor-venv),
makes a JPEG, a PNG with alpha and a WebP with alpha, requests each at widths 360 and
720 in both formats and checks the width and format of every response:

    .venv/bin/python bench/thumbor_reference.py

It exits 0 only if every response is right. Thumbor listens on 127.0.0.1 only.
"""

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pyvips
from servers import free_port, wait_until_up

DEFAULT_VENV = Path.home() / ".cache" / "resize-proxy-bench" / "thumbor-venv"
THUMBOR_REQUIREMENT = "thumbor>=7.8,<8"
STARTUP_TIMEOUT = 30.0
SHUTDOWN_TIMEOUT = 10.0
FORMATS = ("jpg", "webp")


def thumbor_works(thumbor: Path) -> bool:
    """Return whether `thumbor --version` runs and exits with 0."""
    try:
        result = subprocess.run([thumbor, "--version"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def ensure_venv(venv: Path) -> Path:
    """Create a virtual environment at `venv` with the thumbor pip package (7.x) unless it is there already; return the path of its `thumbor` executable."""
    thumbor = venv / "bin" / "thumbor"
    if thumbor_works(thumbor):
        return thumbor

    # The venv is missing or was left half-built by an earlier run, so rebuild it from empty.
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["python3", "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run(
        [venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check", THUMBOR_REQUIREMENT],
        check=True,
    )
    if not thumbor_works(thumbor):
        raise RuntimeError(f"`{thumbor} --version` failed after installing {THUMBOR_REQUIREMENT}; check pip's output")
    return thumbor


def thumbor_config(root: Path, jpeg_quality: int, webp_quality: int) -> str:
    """Return the text of a thumbor.conf that loads files from `root` and stores nothing."""
    settings = {
        "LOADER": "thumbor.loaders.file_loader",
        "FILE_LOADER_ROOT_PATH": str(root.resolve()),
        "STORAGE": "thumbor.storages.no_storage",
        "RESULT_STORAGE": None,
        "QUALITY": jpeg_quality,
        "WEBP_QUALITY": webp_quality,
        "AUTO_WEBP": False,
        "ALLOW_UNSAFE_URL": True,
        "PRESERVE_EXIF_INFO": False,
        # No face or feature detection, and no optimizer run after the encode.
        "DETECTORS": [],
        "OPTIMIZERS": [],
    }
    # NOTE: RESPECT_ORIENTATION stays at thumbor's default (False), so thumbor does not
    # rotate sources by their EXIF Orientation tag, while the proxy does.
    return "".join(f"{key} = {value!r}\n" for key, value in settings.items())


@contextlib.contextmanager
def running_thumbor(
    thumbor: Path, root: Path, *, processes: int = 1, jpeg_quality: int = 90, webp_quality: int = 80
) -> Iterator[str]:
    """Run thumbor on a free port of 127.0.0.1, serving the files under `root`, and yield its base URL.

    Thumbor uses its file loader, with source storage and result storage off. The base
    URL looks like http://127.0.0.1:PORT. On exit, thumbor is stopped and its temporary
    files are removed.
    """
    with tempfile.TemporaryDirectory(prefix="thumbor-") as folder:
        config = Path(folder) / "thumbor.conf"
        config.write_text(thumbor_config(root, jpeg_quality, webp_quality))
        log_path = Path(folder) / "thumbor.log"
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        with log_path.open("wb") as log:
            # Thumbor gets a session of its own, so stopping its process group also
            # stops the workers that it forks when processes > 1.
            server = subprocess.Popen(
                [thumbor, "--ip=127.0.0.1", f"--port={port}", f"--conf={config}", f"--processes={processes}"],
                cwd=folder,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_until_up(f"{base_url}/healthcheck", server, log_path, STARTUP_TIMEOUT)
            yield base_url
        finally:
            stop(server)


def stop(server: subprocess.Popen) -> None:
    """Send SIGTERM to thumbor's process group, then SIGKILL if it has not exited within SHUTDOWN_TIMEOUT."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=SHUTDOWN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=SHUTDOWN_TIMEOUT)


def thumbor_path(name: str, width: int, output_format: str) -> str:
    """Return the URL path that requests `name` (a path relative to root) from thumbor at `width`.

    The height follows the aspect ratio, a narrower source is never enlarged, and
    output_format is 'jpg' or 'webp'. For example, ("a.png", 720, "webp") gives
    /unsafe/720x0/filters:no_upscale():format(webp)/a.png.
    """
    if output_format not in FORMATS:
        raise ValueError(f"invalid output_format {output_format!r}: use jpg or webp")
    # Height 0 follows the aspect ratio. Without no_upscale(), thumbor enlarges a
    # narrower source to the requested width. Without a quality() filter, thumbor uses
    # QUALITY or WEBP_QUALITY from its config.
    # NOTE: for JPEG, thumbor drops the alpha band without flattening, so transparent
    # pixels show their stored colour, while the proxy flattens onto a background colour.
    # Adding the filter background_color(white) flattens onto white, at extra cost.
    return f"/unsafe/{width}x0/filters:no_upscale():format({output_format})/{quote(name)}"


def make_sources(root: Path) -> dict[str, int]:
    """Write a JPEG, a PNG with alpha and a WebP with alpha under `root`; return their widths by name."""
    # A gradient with noise in the blue band, so the encoders have real detail to code.
    def picture(width: int, height: int) -> pyvips.Image:
        xy = pyvips.Image.xyz(width, height)
        red = xy[0] * (255 / width)
        green = xy[1] * (255 / height)
        blue = pyvips.Image.gaussnoise(width, height, mean=128, sigma=40)
        return red.bandjoin([green, blue]).cast("uchar").copy(interpretation="srgb")

    def with_alpha(image: pyvips.Image) -> pyvips.Image:
        # Opaque on the left, fading to fully transparent on the right.
        alpha = (pyvips.Image.xyz(image.width, image.height)[0] * (-255 / image.width) + 255).cast("uchar")
        return image.bandjoin(alpha)

    sources = {"photo.jpg": 1000, "logo.png": 600, "sticker.webp": 800}
    picture(1000, 667).jpegsave(str(root / "photo.jpg"), Q=90)
    with_alpha(picture(600, 400)).pngsave(str(root / "logo.png"))
    with_alpha(picture(800, 800)).webpsave(str(root / "sticker.webp"), Q=90)
    return sources


def check_variant(data: bytes, expected_width: int, output_format: str) -> tuple[bool, str]:
    """Decode one response body; return whether its width and format are right, and a line describing it."""
    image = pyvips.Image.new_from_buffer(data, "")
    loader = image.get("vips-loader")
    actual_format = {"jpegload_buffer": "jpg", "webpload_buffer": "webp"}.get(loader, loader)
    ok = image.width == expected_width and actual_format == output_format
    line = f"{image.width}x{image.height} {actual_format}, {image.bands} bands, {len(data)} bytes"
    return ok, line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="thumbor's venv (default: %(default)s)")
    args = parser.parse_args()

    thumbor = ensure_venv(args.venv)
    version = subprocess.run([thumbor, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"thumbor: {version} ({thumbor})")

    failures = 0
    with tempfile.TemporaryDirectory(prefix="thumbor-smoke-") as folder:
        root = Path(folder)
        sources = make_sources(root)
        with running_thumbor(thumbor, root) as base_url, httpx.Client(base_url=base_url, timeout=60) as client:
            for name, source_width in sources.items():
                for width in (360, 720):
                    for output_format in FORMATS:
                        path = thumbor_path(name, width, output_format)
                        response = client.get(path)
                        if response.status_code != 200:
                            ok, line = False, f"HTTP {response.status_code}"
                        else:
                            ok, line = check_variant(response.content, min(width, source_width), output_format)
                        failures += not ok
                        print(f"{'ok  ' if ok else 'FAIL'} {path}: {line}")

    print("smoke test passed" if failures == 0 else f"smoke test failed: {failures} wrong responses")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
