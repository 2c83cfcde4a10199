"""Speed floor: the proxy's thumbnail and encode in a plain process, with no HTTP or store.

Runs each job of a JSON list with pyvips in a thread pool of CONCURRENCY threads.
A job takes the same steps as one variant in `proxy/imaging.py`: a shrink-on-load
thumbnail to an exact width, conversion to 8-bit sRGB, alpha flattened onto white
for JPEG, and an encode without metadata. The proxy's throughput and latency are
compared against these figures, which leave out the server, the HTTP round trip and
the store. Unlike the proxy, it applies no ICC transform to sources with a non-sRGB
profile, and it makes each job's variant from its own decode.

A job file is a list such as
`[{"source": "/tmp/photo.jpg", "width": 720, "format": "jpg"}, ...]`.

    .venv/bin/python bench/floor.py --jobs jobs.json --concurrency 2

It prints one JSON object on stdout. The peak RSS depends on glibc's malloc arenas,
which the proxy caps at 2 and this script does not. Start it with
MALLOC_ARENA_MAX=2 for a like-for-like memory figure.
"""

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyvips

# `thumbnail` fits a box, so a height at libvips' coordinate cap leaves the width as
# the only limit. The proxy's `UNBOUNDED_HEIGHT` has the same value.
UNBOUNDED_HEIGHT = 10_000_000
FORMATS = ("jpg", "webp")
WHITE = 255


class JobFailed(Exception):
    """libvips could not decode or encode the source of one job."""


def load_jobs(path: Path) -> list[dict]:
    """Read and check the job list, raising ValueError that names the first invalid job."""
    jobs = json.loads(path.read_text())
    if not isinstance(jobs, list) or not jobs:
        raise ValueError(f"{path}: expected a non-empty JSON list of jobs")
    for number, job in enumerate(jobs):
        if not isinstance(job, dict) or not {"source", "width", "format"} <= job.keys():
            raise ValueError(f"{path}: job {number} is missing source, width or format")
        if job["format"] not in FORMATS:
            raise ValueError(f"{path}: job {number} has invalid format {job['format']!r} (expected jpg or webp)")
        if not isinstance(job["width"], int) or job["width"] < 1:
            raise ValueError(f"{path}: job {number} has invalid width {job['width']!r} (expected a positive integer)")
        if not Path(job["source"]).is_file():
            raise ValueError(f"{path}: job {number} source not found: {job['source']}")
    return jobs


def make_variant(
    data: bytes, width: int, output_format: str, jpeg_quality: int, webp_quality: int, webp_effort: int
) -> bytes:
    """Resize one source to `width` and encode it as the proxy does for a single variant."""
    # size="down" never enlarges, so a narrower source keeps its own width.
    image = pyvips.Image.thumbnail_buffer(
        data, width, height=UNBOUNDED_HEIGHT, size="down", option_string="fail_on=error"
    )

    # Grey stays grey. Anything else that is not 8-bit sRGB is converted.
    if image.interpretation in ("b-w", "grey16"):
        if image.format != "uchar":
            image = image.colourspace("b-w")
    elif image.interpretation != "srgb" or image.format != "uchar":
        image = image.colourspace("srgb")

    if output_format == "jpg":
        if image.hasalpha():
            image = image.flatten(background=[WHITE] * (image.bands - 1))
        return image.jpegsave_buffer(Q=jpeg_quality, keep="none", optimize_coding=True)
    return image.webpsave_buffer(Q=webp_quality, effort=webp_effort, keep="none")


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Return the nearest-rank value at `fraction` of an ascending list."""
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * fraction))]


def run(jobs: list[dict], concurrency: int, jpeg_quality: int, webp_quality: int, webp_effort: int) -> dict:
    """Run every job in a pool of `concurrency` threads and return the figures."""
    # Sources are read once before timing, so the figures contain no disk reads.
    sources = {job["source"]: Path(job["source"]).read_bytes() for job in jobs}

    def timed_job(job: dict) -> float:
        # Latency runs from when the job starts in its thread, so time spent
        # waiting in the pool's queue is not counted.
        started = time.perf_counter()
        try:
            make_variant(
                sources[job["source"]], job["width"], job["format"], jpeg_quality, webp_quality, webp_effort
            )
        except pyvips.Error as error:
            detail = error.detail.strip().splitlines()[0] if error.detail.strip() else error.message
            raise JobFailed(f"{job['source']} to {job['width']} px {job['format']}: {detail}") from None
        return time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        latencies = list(pool.map(timed_job, jobs))
    wall = time.perf_counter() - started

    latencies.sort()
    return {
        "jobs": len(jobs),
        "concurrency": concurrency,
        "seconds": round(wall, 3),
        "throughput": round(len(jobs) / wall, 3),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 1),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "peak_rss_mib": round(peak_rss_kib() / 1024, 1),
    }


def peak_rss_kib() -> int:
    """Read this process's peak resident memory (VmHWM), in KiB, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM line in /proc/self/status")


def main() -> int:
    """Parse the arguments, run the jobs and print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=Path, required=True, help="JSON list of {source, width, format} jobs")
    parser.add_argument("--concurrency", type=int, default=2, help="threads in the pool (default: %(default)s)")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="JPEG Q (default: %(default)s)")
    parser.add_argument("--webp-quality", type=int, default=80, help="WebP Q (default: %(default)s)")
    parser.add_argument("--webp-effort", type=int, default=2, help="WebP effort (default: %(default)s)")
    args = parser.parse_args()
    # Like the proxy, turn off the operation cache and keep libvips' default thread count.
    pyvips.cache_set_max(0)
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    try:
        jobs = load_jobs(args.jobs)
    except (OSError, ValueError) as error:
        print(f"floor: {error}", file=sys.stderr)
        return 2

    try:
        figures = run(jobs, args.concurrency, args.jpeg_quality, args.webp_quality, args.webp_effort)
    except JobFailed as error:
        print(f"floor: libvips failed on {error}", file=sys.stderr)
        return 1
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
