"""Benchmark the proxy side by side with its references, in one run.

    bash bench/run                 # installs what it needs, then runs this
    .venv/bin/python bench/run.py --quick

Figures, each next to its reference and given as a ratio:

- cold variants (a store miss, then decode, resize, encode and store) at
  concurrency 1, 2, 4 and 8, on the local-folder store and on moto's S3 server,
  against the same pyvips work in a plain process (bench/floor.py) and against
  thumbor (bench/thumbor_reference.py);
- hot hits from the memory cache, measured with wrk, against a minimal ASGI app
  (bench/minimal_asgi.py) and nginx serving the same bytes;
- upload-event mode making every width × format of a 24-megapixel JPEG, against
  Pillow with a full decode making four JPEG widths (bench/pillow_lambda.py);
- the proxy's peak resident memory under 8 concurrent cold requests;
- S3 requests per cold variant, per upload and per hot hit, counted from the
  request log of moto's server.

Every server listens on 127.0.0.1 and is stopped at the end; the inputs and stores
live in a temporary folder that is removed. Results are printed as Markdown and
written as JSON (--output).
"""

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pyvips

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import thumbor_reference  # noqa: E402
from servers import free_port, wait_until_up  # noqa: E402

PYTHON = sys.executable
MATE = Path("/usr/share/backgrounds/mate")
WIDTHS = (360, 720, 1200, 2200)
FORMATS = ("jpg", "webp")
JPEG_QUALITY = 90
WEBP_QUALITY = 80
# The proxy's default. thumbor has no setting for it and encodes at Pillow's
# default, libwebp method 4, which took 2.6 times as long as 2 on a 2200 px photo.
WEBP_EFFORT = 2
THUMBOR_VENV = Path.home() / ".cache" / "resize-proxy-bench" / "thumbor-venv"
# Seconds that a server may take to respond after it starts.
START_TIMEOUT = 60
# Seconds that one benchmark request may take before the run fails.
REQUEST_TIMEOUT = 120


@dataclass
class Source:
    """One benchmark input: a file and the extension its copies get."""

    kind: str
    path: Path
    ext: str
    description: str


@dataclass
class Run:
    """Throughput and latency of one batch of requests or jobs."""

    jobs: int
    seconds: float
    latencies: list[float] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.jobs / self.seconds

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] * 1000

    def summary(self) -> dict:
        return {
            "jobs": self.jobs,
            "seconds": round(self.seconds, 3),
            "throughput": round(self.throughput, 3),
            "p50_ms": round(self.percentile(0.5), 1),
            "p99_ms": round(self.percentile(0.99), 1),
        }


# Inputs


def prepare_sources(folder: Path) -> dict[str, Source]:
    """Collect the real photographs and make the generated inputs in `folder`."""
    photo = MATE / "nature" / "TwoWings.jpg"
    elephants = MATE / "abstract" / "Elephants_5640x3172.jpg"
    alpha_png = MATE / "abstract" / "Gulp.png"
    for path in (photo, elephants, alpha_png):
        if not path.exists():
            sys.exit(f"bench: {path} not found; install the Debian package mate-backgrounds (bash bench/run does)")

    # 6000×4000 from a real 2560×1600 photo: scaled up, cropped to 3:2, given
    # sensor-like noise so that it compresses like a camera file rather than a
    # smooth upscale, and saved as a baseline JPEG at quality 90.
    large = folder / "photo-6000x4000.jpg"
    image = pyvips.Image.new_from_file(str(photo)).resize(4000 / 1600)
    image = image.crop((image.width - 6000) // 2, 0, 6000, 4000)
    noise = pyvips.Image.gaussnoise(6000, 4000, sigma=6, mean=0)
    image = (image + noise).cast("uchar").copy(interpretation="srgb")
    image.jpegsave(str(large), Q=90)

    alpha_webp = folder / "gulp-alpha.webp"
    pyvips.Image.new_from_file(str(alpha_png)).webpsave(str(alpha_webp), Q=90)

    return {
        "jpeg-24mp": Source("jpeg-24mp", large, "jpg", "6000×4000 baseline JPEG, from TwoWings.jpg"),
        "jpeg-progressive": Source(
            "jpeg-progressive", elephants, "jpg", "5640×3172 progressive JPEG, Elephants_5640x3172.jpg"
        ),
        "png-alpha": Source("png-alpha", alpha_png, "png", "1920×1200 RGBA PNG, Gulp.png"),
        "webp-alpha": Source("webp-alpha", alpha_webp, "webp", "1920×1200 WebP with alpha, from Gulp.png"),
    }


class Names:
    """Hand out source names that no earlier request used, so every request is cold."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.count = 0
        root.mkdir(parents=True, exist_ok=True)

    def link(self, source: Source) -> str:
        """Link a new name to `source` under `root`; return its key below `original/`."""
        self.count += 1
        name = f"bench/{source.kind}-{self.count:05d}"
        target = self.root / f"{name}.{source.ext}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(source.path, target)
        return name


def mix(sources: dict[str, Source], kinds: list[str]) -> list[tuple[Source, int, str]]:
    """List every width × format of every kind, interleaved so kinds alternate."""
    return [(sources[kind], width, fmt) for width in WIDTHS for fmt in FORMATS for kind in kinds]


# Processes


@contextlib.contextmanager
def process(command: list[str], env: dict[str, str], log: Path, ready_url: str) -> Iterator[subprocess.Popen]:
    """Run `command` with its output in `log`, wait for `ready_url`, and stop it afterwards."""
    with log.open("wb") as output:
        child = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_until_up(ready_url, child, log, START_TIMEOUT)
        yield child
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


@contextlib.contextmanager
def proxy(work: Path, storage: str, extra_env: dict[str, str] | None = None) -> Iterator[tuple[str, int]]:
    """Run `resize-proxy serve` with one worker; yield its base URL and process id."""
    port = free_port()
    env = {
        **os.environ,
        "PROXY_STORAGE": storage,
        "PROXY_EVENT_TOKEN": "bench-token",
        "PROXY_PREVIEW": "0",
        **(extra_env or {}),
    }
    base_url = f"http://127.0.0.1:{port}"
    log = work / f"proxy-{port}.log"
    command = [PYTHON, "-m", "proxy", "serve", "--host", "127.0.0.1", "--port", str(port)]
    with process(command, env, log, f"{base_url}/healthz") as child:
        yield base_url, child.pid


def peak_rss_mib(pid: int) -> float:
    """Read a process's peak resident memory (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


# Load


async def fetch_all(base_url: str, paths: list[str], concurrency: int) -> Run:
    """GET every path with `concurrency` requests in flight; fail on any non-200."""
    queue = list(reversed(paths))
    latencies: list[float] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            path = queue.pop()
            started = time.perf_counter()
            response = await client.get(path)
            latencies.append(time.perf_counter() - started)
            if response.status_code != 200:
                raise RuntimeError(f"GET {path}: {response.status_code} {response.text[:200]}")

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return Run(len(paths), seconds, latencies)


def check_widths(base_url: str, paths_and_widths: list[tuple[str, int]]) -> None:
    """Decode a few responses to make sure the system made what it was asked for."""
    for path, width in paths_and_widths:
        body = httpx.get(base_url + path, timeout=REQUEST_TIMEOUT).content
        image = pyvips.Image.new_from_buffer(body, "")
        if image.width != width:
            raise RuntimeError(f"{base_url}{path} is {image.width} px wide, expected {width}")


def expected_width(source: Source, width: int) -> int:
    return min(width, pyvips.Image.new_from_file(str(source.path)).width)


def proxy_cold(base_url: str, names: Names, jobs: list[tuple[Source, int, str]], concurrency: int) -> Run:
    paths = [f"/r/{names.link(source)}-{width}.{fmt}" for source, width, fmt in jobs]
    return asyncio.run(fetch_all(base_url, paths, concurrency))


def thumbor_cold(base_url: str, names: Names, jobs: list[tuple[Source, int, str]], concurrency: int) -> Run:
    paths = [
        thumbor_reference.thumbor_path(f"{names.link(source)}.{source.ext}", width, fmt)
        for source, width, fmt in jobs
    ]
    return asyncio.run(fetch_all(base_url, paths, concurrency))


def floor_cold(work: Path, jobs: list[tuple[Source, int, str]], concurrency: int) -> dict:
    """Run the jobs in bench/floor.py; return what it reports, throughput included."""
    job_file = work / f"floor-{uuid.uuid4().hex}.json"
    job_file.write_text(
        json.dumps([{"source": str(source.path), "width": width, "format": fmt} for source, width, fmt in jobs])
    )
    command = [
        PYTHON, str(BENCH / "floor.py"), "--jobs", str(job_file), "--concurrency", str(concurrency),
        "--jpeg-quality", str(JPEG_QUALITY), "--webp-quality", str(WEBP_QUALITY), "--webp-effort", str(WEBP_EFFORT),
    ]
    # The proxy caps glibc's malloc arenas at two; the floor gets the same cap.
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    if completed.returncode != 0:
        raise RuntimeError(f"bench/floor.py failed:\n{completed.stderr[-2000:]}")
    return json.loads(completed.stdout)


# moto's S3 server, with its request log counted


@contextlib.contextmanager
def moto_server(work: Path) -> Iterator[tuple[str, Path]]:
    """Run moto's server in its own process; yield its URL and its request log."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = work / "moto.log"
    command = [str(Path(PYTHON).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with process(command, dict(os.environ), log, f"{url}/moto-api/") as child:
        yield url, log
        del child


# werkzeug's request lines, which it colours with terminal escapes by status.
REQUEST_LINE = re.compile(r'"(?:\x1b\[[0-9;]*m)?(GET|PUT|HEAD|POST|DELETE) (\S+) HTTP/1\.1(?:\x1b\[0m)?" (\d{3})')


def s3_requests(log: Path, start: int) -> Counter:
    """Count the S3 requests logged after byte `start` of moto's log, by kind."""
    counts: Counter = Counter()
    with log.open("rb") as handle:
        handle.seek(start)
        text = handle.read().decode("utf-8", "replace")
    for method, target, status in REQUEST_LINE.findall(text):
        if target.startswith("/moto-api"):
            continue
        path, _, query = target.partition("?")
        if method == "GET" and "list-type" in query:
            counts["LIST"] += 1
        elif method == "GET" and "/r/" in path:
            counts["GET variant (miss)" if status == "404" else "GET variant"] += 1
        elif method == "GET":
            counts["GET source" if status == "200" else "GET source (miss)"] += 1
        else:
            counts[method] += 1
    return counts


def log_size(log: Path) -> int:
    return log.stat().st_size


def s3_env(url: str, bucket: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL_S3": url,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_REGION": "us-east-1",
        "PROXY_STORAGE": f"s3://{bucket}",
    }


def s3_client(url: str):
    import boto3

    return boto3.client(
        "s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="bench", aws_secret_access_key="bench"
    )


# Sections


def section_cold_local(work: Path, sources: dict[str, Source], concurrencies: list[int], repeat: int) -> dict:
    """Cold variants on the local store, the floor and thumbor, on the same jobs."""
    store = work / "local-store"
    names = Names(store / "original")
    kinds = list(sources)
    jobs = mix(sources, kinds) * repeat
    results: dict = {"mix": {}, "by_kind": {}, "by_output": {}}
    thumbor = thumbor_reference.ensure_venv(THUMBOR_VENV)
    with proxy(work, str(store)) as (proxy_url, _), thumbor_reference.running_thumbor(
        thumbor, store / "original", processes=1, jpeg_quality=JPEG_QUALITY, webp_quality=WEBP_QUALITY
    ) as thumbor_url:
        # One request of each kind first, so that imports and first-use costs are
        # not counted, and a check that each system makes the requested width.
        warm = [(sources[kind], 720, "jpg") for kind in kinds]
        proxy_cold(proxy_url, names, warm, 1)
        thumbor_cold(thumbor_url, names, warm, 1)
        for source in sources.values():
            name = names.link(source)
            check_widths(proxy_url, [(f"/r/{name}-2200.webp", expected_width(source, 2200))])
            thumbor_path = thumbor_reference.thumbor_path(f"{name}.{source.ext}", 2200, "webp")
            check_widths(thumbor_url, [(thumbor_path, expected_width(source, 2200))])

        for concurrency in concurrencies:
            floor = floor_cold(work, jobs, concurrency)
            served = proxy_cold(proxy_url, names, jobs, concurrency)
            thumbed = thumbor_cold(thumbor_url, names, jobs, concurrency)
            results["mix"][concurrency] = {
                "proxy": served.summary(),
                "floor": floor,
                "thumbor": thumbed.summary(),
                "proxy_vs_floor": round(served.throughput / floor["throughput"], 3),
                "proxy_vs_thumbor": round(served.throughput / thumbed.throughput, 3),
            }
            print_progress(f"cold local c={concurrency}", results["mix"][concurrency])

        for kind in kinds:
            kind_jobs = mix(sources, [kind]) * repeat
            served = proxy_cold(proxy_url, names, kind_jobs, 2)
            thumbed = thumbor_cold(thumbor_url, names, kind_jobs, 2)
            floor = floor_cold(work, kind_jobs, 2)
            results["by_kind"][kind] = {
                "proxy": served.summary(),
                "thumbor": thumbed.summary(),
                "floor": floor,
                "proxy_vs_thumbor": round(served.throughput / thumbed.throughput, 3),
                "proxy_vs_floor": round(served.throughput / floor["throughput"], 3),
            }
            print_progress(f"cold by kind {kind} c=2", results["by_kind"][kind])

        # thumbor encodes WebP at a higher effort than the proxy and has no setting
        # for it, so each output format is also compared on its own.
        for output_format in FORMATS:
            format_jobs = [job for job in jobs if job[2] == output_format]
            served = proxy_cold(proxy_url, names, format_jobs, 2)
            thumbed = thumbor_cold(thumbor_url, names, format_jobs, 2)
            results["by_output"][output_format] = {
                "proxy": served.summary(),
                "thumbor": thumbed.summary(),
                "proxy_vs_thumbor": round(served.throughput / thumbed.throughput, 3),
            }
            print_progress(f"cold by output {output_format} c=2", results["by_output"][output_format])
    shutil.rmtree(store / "r", ignore_errors=True)
    return results


def section_s3(work: Path, sources: dict[str, Source], concurrencies: list[int]) -> dict:
    """Cold variants on moto's S3 server, and the S3 requests of each operation."""
    results: dict = {"cold": {}, "requests": {}}
    bucket = "bench-" + uuid.uuid4().hex[:12]
    with moto_server(work) as (url, log):
        client = s3_client(url)
        client.create_bucket(Bucket=bucket)
        bodies = {kind: source.path.read_bytes() for kind, source in sources.items()}
        counter = 0

        def upload(source: Source) -> str:
            nonlocal counter
            counter += 1
            name = f"bench/{source.kind}-{counter:05d}"
            client.put_object(Bucket=bucket, Key=f"original/{name}.{source.ext}", Body=bodies[source.kind])
            return name

        kinds = [kind for kind in sources if kind != "jpeg-progressive"]
        with proxy(work, f"s3://{bucket}", s3_env(url, bucket)) as (proxy_url, _):
            warm = [upload(sources[kind]) for kind in kinds]
            asyncio.run(fetch_all(proxy_url, [f"/r/{name}-720.jpg" for name in warm], 1))
            for concurrency in concurrencies:
                jobs = mix(sources, kinds)
                paths = [f"/r/{upload(source)}-{width}.{fmt}" for source, width, fmt in jobs]
                start = log_size(log)
                run = asyncio.run(fetch_all(proxy_url, paths, concurrency))
                results["cold"][concurrency] = {**run.summary(), "s3_requests": dict(s3_requests(log, start))}
                print_progress(f"cold s3 c={concurrency}", results["cold"][concurrency])

        # A fresh process, because the mixed runs above taught the proxy to list first.
        with proxy(work, f"s3://{bucket}", s3_env(url, bucket)) as (proxy_url, _):
            # Per cold variant: a source with the variant's extension, and twice one
            # without, since the first lookup teaches the proxy to list first.
            for label, ext in (
                ("same extension", "jpg"),
                ("other extension, first", "webp"),
                ("other extension, next", "webp"),
            ):
                name = upload(sources["jpeg-24mp"])
                start = log_size(log)
                asyncio.run(fetch_all(proxy_url, [f"/r/{name}-720.{ext}"], 1))
                results["requests"][f"cold variant, {label}"] = dict(s3_requests(log, start))

            # Per hot hit: the variant just made is in the memory cache.
            start = log_size(log)
            asyncio.run(fetch_all(proxy_url, [f"/r/{name}-720.webp"] * 100, 4))
            results["requests"]["100 hot hits"] = dict(s3_requests(log, start))

            # Per upload: every width × format through POST /events/s3.
            name = upload(sources["jpeg-24mp"])
            key = f"original/{name}.jpg"
            start = log_size(log)
            post_event(proxy_url, bucket, key)
            results["requests"]["upload of one source"] = dict(s3_requests(log, start))
    for label, counts in results["requests"].items():
        print_progress(f"s3 requests: {label}", counts)
    return results


def post_event(base_url: str, bucket: str, key: str, client: httpx.Client | None = None) -> float:
    """Post an ObjectCreated event for `key` and return the seconds until the 200.

    With `client`, its open connection is reused. Setting up a new client took
    about 50 ms here, which is no work of the proxy's.
    """
    document = {
        "Records": [
            {
                "eventSource": "aws:s3",
                "eventName": "ObjectCreated:Put",
                "s3": {"bucket": {"name": bucket}, "object": {"key": key.replace(" ", "+"), "size": 1}},
            }
        ]
    }
    started = time.perf_counter()
    response = (client or httpx).post(
        f"{base_url}/events/s3",
        json=document,
        headers={"Authorization": "Bearer bench-token"},
        timeout=REQUEST_TIMEOUT,
    )
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"POST /events/s3 for {key}: {response.status_code} {response.text[:300]}")
    return seconds


def section_upload(work: Path, sources: dict[str, Source], repeat: int) -> dict:
    """Upload-event mode on the local store against the Pillow full-decode approach."""
    store = work / "upload-store"
    names = Names(store / "original")
    source = sources["jpeg-24mp"]
    times, pillow_runs = [], []
    command = [
        PYTHON, str(BENCH / "pillow_lambda.py"), "--source", str(source.path),
        "--widths", ",".join(map(str, WIDTHS)), "--repeat", "1",
    ]
    with proxy(work, str(store)) as (proxy_url, _), httpx.Client() as client:
        post_event(proxy_url, "local", f"original/{names.link(source)}.jpg", client)
        # The two take turns, so that a slow spell of the machine falls on both.
        for _ in range(repeat):
            times.append(post_event(proxy_url, "local", f"original/{names.link(source)}.jpg", client))
            output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=900).stdout
            pillow_runs.append(json.loads(output)["median_s"])
        variant_files = sorted(path.name for path in (store / "r" / "bench").iterdir())
    pillow = {"median_s": round(statistics.median(pillow_runs), 4)}
    proxy_median = statistics.median(times)
    result = {
        "source": source.description,
        "proxy_variants": len(WIDTHS) * len(FORMATS),
        "proxy_median_s": round(proxy_median, 3),
        "proxy_runs_s": [round(value, 3) for value in times],
        "pillow_variants": len(WIDTHS),
        "pillow_median_s": pillow["median_s"],
        "pillow_runs_s": [round(value, 3) for value in pillow_runs],
        "speedup": round(pillow["median_s"] / proxy_median, 2),
        "files_made": len(variant_files),
    }
    print_progress("upload", result)
    return result


def wrk(url: str, seconds: int, connections: int) -> float:
    """Run wrk against `url`; return requests per second."""
    output = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", url],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if match is None:
        raise RuntimeError(f"wrk printed no rate:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_2xx:
        raise RuntimeError(f"wrk got {non_2xx.group(1)} error responses from {url}")
    return float(match.group(1))


NGINX_CONF = """
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {work}/nginx-body;
    proxy_temp_path {work}/nginx-proxy;
    fastcgi_temp_path {work}/nginx-fastcgi;
    uwsgi_temp_path {work}/nginx-uwsgi;
    scgi_temp_path {work}/nginx-scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ add_header Cache-Control "public, max-age=31536000, immutable"; }}
    }}
}}
"""


def section_hot(work: Path, sources: dict[str, Source], seconds: int, rounds: int) -> dict:
    """Measure hot hits from the proxy's memory cache, a minimal ASGI app and nginx.

    The three servers run side by side and take turns under wrk, `rounds` times,
    so that a slow spell of the machine falls on all of them. Each figure is the
    median of its rounds; the proxy's ratio to the minimal app is also given
    for each round.
    """
    store = work / "hot-store"
    names = Names(store / "original")
    name = names.link(sources["jpeg-24mp"])
    path = f"/r/{name}-720.jpg"
    rates: dict[str, list[float]] = {"proxy": [], "minimal_asgi": [], "nginx": []}
    with contextlib.ExitStack() as stack:
        proxy_url, _ = stack.enter_context(proxy(work, str(store)))
        httpx.get(proxy_url + path, timeout=REQUEST_TIMEOUT).raise_for_status()
        urls = {"proxy": proxy_url + path}

        port = free_port()
        env = {**os.environ, "BENCH_BODY": str(store / path.lstrip("/"))}
        command = [
            PYTHON, "-m", "uvicorn", "--app-dir", str(BENCH), "minimal_asgi:app", "--host", "127.0.0.1",
            "--port", str(port), "--no-access-log", "--no-server-header", "--no-proxy-headers",
            "--log-level", "warning",
        ]
        stack.enter_context(process(command, env, work / "minimal.log", f"http://127.0.0.1:{port}/"))
        urls["minimal_asgi"] = f"http://127.0.0.1:{port}/"

        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        if os.path.exists(nginx):
            port = free_port()
            conf = work / "nginx.conf"
            conf.write_text(NGINX_CONF.format(work=work, port=port, root=store))
            command = [nginx, "-p", str(work), "-c", str(conf), "-e", str(work / "nginx-error.log"), "-g", "daemon off;"]
            stack.enter_context(process(command, dict(os.environ), work / "nginx.log", f"http://127.0.0.1:{port}{path}"))
            urls["nginx"] = f"http://127.0.0.1:{port}{path}"

        for turn in range(rounds):
            # The order flips every round, so a steady drift of the machine's
            # speed favours no server.
            order = list(urls.items())
            for server, url in order if turn % 2 == 0 else reversed(order):
                # An untimed second first. Without it the proxy's ratio swung
                # between 0.54 and 0.85 with the order in which the servers ran.
                wrk(url, 1, 16)
                rates[server].append(wrk(url, seconds, 16))

    results: dict = {server: round(statistics.median(values), 1) for server, values in rates.items() if values}
    results["rounds"] = {server: values for server, values in rates.items() if values}
    results["proxy_vs_minimal_asgi"] = round(results["proxy"] / results["minimal_asgi"], 3)
    by_round = [proxy_rate / minimal_rate for proxy_rate, minimal_rate in zip(rates["proxy"], rates["minimal_asgi"])]
    results["proxy_vs_minimal_asgi_by_round"] = [round(ratio, 3) for ratio in by_round]
    # Each round's two rates come from adjacent runs, so their ratio is less
    # exposed to the machine's drift than the ratio of the medians.
    results["proxy_vs_minimal_asgi_median_of_rounds"] = round(statistics.median(by_round), 3)
    print_progress("hot hits", results)
    return results


def section_memory(work: Path, sources: dict[str, Source], count: int) -> dict:
    """Peak RSS of a fresh proxy process under 8 concurrent cold 24-megapixel requests."""
    store = work / "memory-store"
    names = Names(store / "original")
    source = sources["jpeg-24mp"]
    jobs = [(source, WIDTHS[index % len(WIDTHS)], FORMATS[index % 2]) for index in range(count)]
    with proxy(work, str(store)) as (proxy_url, pid):
        idle = peak_rss_mib(pid)
        run = proxy_cold(proxy_url, names, jobs, 8)
        peak = peak_rss_mib(pid)
    result = {"source": source.description, "requests": count, "idle_mib": round(idle), "peak_mib": round(peak), **run.summary()}
    print_progress("memory", result)
    return result


def print_progress(label: str, value: dict) -> None:
    print(f"bench: {label}: {json.dumps(value)}", file=sys.stderr, flush=True)


def machine() -> dict:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(int(memory) / 1024 / 1024, 1),
        "python": platform.python_version(),
        "libvips": ".".join(str(pyvips.version(part)) for part in range(3)),
        "date": time.strftime("%Y-%m-%d"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and shorter wrk runs, to check the harness")
    parser.add_argument(
        "--sections", default="cold,s3,upload,hot,memory", help="comma-separated sections to run (default: %(default)s)"
    )
    parser.add_argument("--output", type=Path, default=Path("bench-results.json"), help="JSON results file")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    concurrencies = [1, 2, 4, 8]

    results: dict = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="resize-proxy-bench-") as folder:
        work = Path(folder)
        # nginx workers run as an unprivileged user and must reach the files.
        work.chmod(0o755)
        sources = prepare_sources(work)
        results["inputs"] = {kind: source.description for kind, source in sources.items()}
        if "cold" in sections:
            results["cold_local"] = section_cold_local(work, sources, concurrencies, 1 if args.quick else 2)
        if "s3" in sections:
            results["s3"] = section_s3(work, sources, [1, 4] if args.quick else concurrencies)
        if "upload" in sections:
            results["upload"] = section_upload(work, sources, 2 if args.quick else 7)
        if "hot" in sections:
            # Short rounds, many times, because this VM's speed drifts by a third
            # within a minute and each round's servers run close together in time.
            results["hot"] = section_hot(work, sources, 2 if args.quick else 3, 2 if args.quick else 8)
        if "memory" in sections:
            results["memory"] = section_memory(work, sources, 16 if args.quick else 48)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
