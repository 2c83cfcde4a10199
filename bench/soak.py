"""Soak test: cold variant requests on large real photos, with the server's memory sampled.

Starts `resize-proxy serve` on 127.0.0.1 with a local-folder store in a temporary
folder, copies one large photo there under many names, then keeps CONCURRENCY
requests in flight for DURATION seconds. Every request is for a variant that does not
exist yet, so each one decodes and encodes. It samples the server's resident memory
(VmRSS) twice a second and reports its peak and whether it grows over the run.

    .venv/bin/python bench/soak.py --duration 60 --concurrency 8

The run stops by itself; all traffic goes to 127.0.0.1.
"""

import argparse
import asyncio
import itertools
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from servers import free_port, wait_until_up

DEFAULT_PHOTO = Path("/usr/share/backgrounds/mate/abstract/Elephants_5640x3172.jpg")
WIDTHS = (360, 720, 1200, 2200)
FORMATS = ("jpg", "webp")
# Seconds that the proxy may take to start.
START_TIMEOUT = 60


def rss_kib(pid: int) -> int:
    """Read the resident memory of a process, in KiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


async def sample_memory(pid: int, samples: list[tuple[float, int]], stop: asyncio.Event) -> None:
    started = time.monotonic()
    while not stop.is_set():
        samples.append((time.monotonic() - started, rss_kib(pid)))
        await asyncio.sleep(0.5)


async def load(base_url: str, sources: int, concurrency: int, duration: float) -> tuple[int, int, list[float]]:
    """Send cold variant requests until `duration` ends; return (ok, failed, latencies)."""
    paths = (
        f"/r/soak/p{number:04d}-{width}.{fmt}"
        for number, width, fmt in itertools.product(range(sources), WIDTHS, FORMATS)
    )
    deadline = time.monotonic() + duration
    ok = failed = 0
    latencies: list[float] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal ok, failed
        while time.monotonic() < deadline:
            path = next(paths, None)
            if path is None:
                return
            started = time.monotonic()
            response = await client.get(path)
            latencies.append(time.monotonic() - started)
            if response.status_code == 200:
                ok += 1
            else:
                failed += 1

    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return ok, failed, latencies


def trend(samples: list[tuple[float, int]]) -> tuple[float, float]:
    """Mean RSS, in MiB, of the second and the last third of the run."""
    values = [rss for _, rss in samples]
    third = max(1, len(values) // 3)
    middle = statistics.mean(values[third : 2 * third] or values) / 1024
    last = statistics.mean(values[-third:]) / 1024
    return middle, last


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60, help="seconds of load (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default: %(default)s)")
    parser.add_argument("--photo", type=Path, default=DEFAULT_PHOTO, help="source photo (default: %(default)s)")
    parser.add_argument("--sources", type=int, default=400, help="copies of the photo (default: %(default)s)")
    args = parser.parse_args()
    if not args.photo.exists():
        print(f"soak: {args.photo} not found; install mate-backgrounds or pass --photo", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="soak-") as folder:
        store = Path(folder) / "store"
        (store / "original" / "soak").mkdir(parents=True)
        # Symbolic links give many sources without copying the photo each time.
        for number in range(args.sources):
            (store / "original" / "soak" / f"p{number:04d}.jpg").symlink_to(args.photo.resolve())
        port = free_port()
        # MALLOC_ARENA_MAX is left out, so that the proxy's own arena cap is what runs.
        env = {name: value for name, value in os.environ.items() if name != "MALLOC_ARENA_MAX"}
        env.update({"PROXY_STORAGE": str(store), "PROXY_LOG_LEVEL": "WARNING"})
        server = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        try:
            base_url = f"http://127.0.0.1:{port}"
            wait_until_up(f"{base_url}/healthz", server, None, START_TIMEOUT)
            idle = rss_kib(server.pid)
            samples: list[tuple[float, int]] = []
            stop = asyncio.Event()
            sampler = asyncio.create_task(sample_memory(server.pid, samples, stop))
            started = time.monotonic()
            ok, failed, latencies = await load(base_url, args.sources, args.concurrency, args.duration)
            # Requests in flight at the end of the duration still finish, so
            # the rate is over the time until the last one did.
            elapsed = time.monotonic() - started
            stop.set()
            await sampler
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)

    peak = max(rss for _, rss in samples) / 1024
    middle, last = trend(samples)
    latencies.sort()
    print(f"photo: {args.photo.name}; concurrency {args.concurrency}; {args.duration:g} s")
    print(f"requests: {ok} ok, {failed} failed in {elapsed:.0f} s, {ok / elapsed:.2f} variants/s")
    if latencies:
        p50 = latencies[len(latencies) // 2]
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        print(f"latency: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    print(f"RSS: idle {idle / 1024:.0f} MiB, peak {peak:.0f} MiB")
    print(f"RSS trend: second third {middle:.0f} MiB, last third {last:.0f} MiB ({last - middle:+.0f} MiB)")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
