"""`resize-proxy backfill` on moto's S3 server: exact work, counts, dry runs, interrupts."""

import io
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import FAKE_CREDENTIALS, REPO, CountingStore, decode, make_image

from proxy.backfill import BackfillReport, Progress, plan, run_backfill
from proxy.cli import main
from proxy.store import open_store
from proxy.uploads import UploadHandler

SIZES = [(width, fmt) for width in (360, 720, 1200, 2200) for fmt in ("jpg", "webp")]


def variant_keys(s3, bucket: str) -> set[str]:
    keys: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="r/"):
        keys.update(item["Key"] for item in page.get("Contents", []))
    return keys


def all_variants(stem_path: str) -> set[str]:
    return {f"r/{stem_path}-{width}.{fmt}" for width, fmt in SIZES}


@pytest.fixture
def sources(s3, bucket) -> list[str]:
    """30 generated sources, alternately JPEG and PNG, under original/set/."""
    keys = []
    for number in range(30):
        suffix = ".jpg" if number % 2 == 0 else ".png"
        key = f"original/set/s{number:02d}{suffix}"
        s3.put_object(Bucket=bucket, Key=key, Body=make_image(400 + number, 300, suffix))
        keys.append(key)
    return keys


@pytest.fixture
def s3_env(bucket, aws_env, settings_for):
    """PROXY_* and AWS_* variables set for `main()`, which reads the environment."""
    return settings_for(storage=f"s3://{bucket}")


async def test_backfill_makes_exactly_missing_variants(s3, bucket, sources, s3_env, photo):
    settings = s3_env
    s3.put_object(Bucket=bucket, Key="original/set/notes.txt", Body=b"not an image")
    counting = CountingStore(await open_store(settings))
    executor = ThreadPoolExecutor(max_workers=2)
    handler = UploadHandler(counting, settings, executor)
    try:
        # Complete s00-s09 first, then remove two variants of s05.
        jobs, report = await plan(handler, "set/s0", force=False)
        await run_backfill(handler, jobs, report, concurrency=2, progress=Progress(10, io.StringIO()))
        s3.delete_object(Bucket=bucket, Key="r/set/s05-360.webp")
        s3.delete_object(Bucket=bucket, Key="r/set/s05-2200.jpg")
        counting.calls.clear()

        jobs, report = await plan(handler, "", force=False)
        await run_backfill(handler, jobs, report, concurrency=3, progress=Progress(30, io.StringIO()))
    finally:
        executor.shutdown()
        await counting.close()

    written = [key for operation, key in counting.calls if operation == "put"]
    expected = {"r/set/s05-360.webp", "r/set/s05-2200.jpg"}
    for number in range(10, 30):
        expected |= all_variants(f"set/s{number:02d}")
    assert sorted(written) == sorted(expected)
    assert report.sources == 30
    assert report.made == 21
    assert report.variants == 162
    assert report.complete == 9
    assert report.ignored == 1
    assert report.failures == []
    assert len(variant_keys(s3, bucket)) == 30 * len(SIZES)


def test_backfill_command_reports_counts(s3, bucket, sources, s3_env, capsys):
    assert main(["backfill", "--prefix", "set/s1"]) == 0
    first = capsys.readouterr().out

    assert main(["backfill"]) == 0
    second = capsys.readouterr().out

    assert "10 sources: 10 made (80 variants), 0 already complete, 0 failed" in first
    assert "30 sources: 20 made (160 variants), 10 already complete, 0 failed" in second
    assert len(variant_keys(s3, bucket)) == 240


def test_backfill_variants_match_source(s3, bucket, s3_env, photo):
    s3.put_object(Bucket=bucket, Key="original/photo.jpg", Body=photo)
    source = decode(photo)

    assert main(["backfill"]) == 0

    for width, fmt in SIZES:
        body = s3.get_object(Bucket=bucket, Key=f"r/photo-{width}.{fmt}")["Body"].read()
        image = decode(body)
        assert image.width == min(width, source.width), (width, fmt)
        assert image.height == round(source.height * image.width / source.width), (width, fmt)


def test_dry_run_writes_nothing(s3, bucket, sources, s3_env, capsys):
    assert main(["backfill", "--prefix", "set/s0"]) == 0
    capsys.readouterr()
    before = variant_keys(s3, bucket)

    assert main(["backfill", "--dry-run"]) == 0
    output = capsys.readouterr().out

    assert variant_keys(s3, bucket) == before
    assert "dry run: 30 sources, 20 need variants (160 variants), 10 complete" in output
    assert "would make 8 variants of original/set/s29.png" in output
    assert "nothing was written" in output


def test_force_remakes_existing_variants(s3, bucket, s3_env, capsys):
    s3.put_object(Bucket=bucket, Key="original/one.jpg", Body=make_image(500, 300))
    assert main(["backfill"]) == 0
    s3.put_object(Bucket=bucket, Key="r/one-360.jpg", Body=b"stale")
    capsys.readouterr()

    assert main(["backfill"]) == 0
    unforced = capsys.readouterr().out
    assert main(["backfill", "--force"]) == 0
    forced = capsys.readouterr().out

    assert "1 already complete" in unforced
    assert "1 made (8 variants)" in forced
    assert decode(s3.get_object(Bucket=bucket, Key="r/one-360.jpg")["Body"].read()).width == 360


def test_failed_source_reported_and_exit_nonzero(s3, bucket, s3_env, capsys):
    s3.put_object(Bucket=bucket, Key="original/good.jpg", Body=make_image(500, 300))
    s3.put_object(Bucket=bucket, Key="original/bad.jpg", Body=b"not an image at all" * 20)

    status = main(["backfill"])
    output = capsys.readouterr().out

    assert status == 1
    assert "1 made (8 variants)" in output
    assert "1 failed" in output
    assert "failed: original/bad.jpg: source is not an image" in output
    assert not any(key.startswith("r/bad-") for key in variant_keys(s3, bucket))


def test_unreachable_store_fails_with_message(s3_env, monkeypatch, capsys):
    # Port 9 on 127.0.0.1 (discard) has no listener here, so connects are refused.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("PROXY_S3_MAX_ATTEMPTS", "1")

    status = main(["backfill"])
    error = capsys.readouterr().err

    assert status == 1
    assert "backfill failed: S3 LIST" in error


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_terminal():
    stream = FakeTerminal()
    progress = Progress(total=4, stream=stream)
    report = BackfillReport(made=2, variants=16)

    progress.update(report)
    progress.finish(report)

    assert stream.getvalue() == "\r[###############...............] 2/4 sources, 16 variants made, 0 failed\n"


def test_progress_lines_when_not_terminal():
    stream = io.StringIO()
    progress = Progress(total=4, stream=stream, interval=0)

    progress.update(BackfillReport(made=1, variants=8))
    progress.update(BackfillReport(made=2, variants=16))
    progress.finish(BackfillReport(made=2, variants=16))

    assert stream.getvalue().splitlines() == [
        "backfill: 1/4 sources, 8 variants made, 0 failed",
        "backfill: 2/4 sources, 16 variants made, 0 failed",
    ]


def test_interrupted_backfill_finishes_on_rerun(s3, bucket, aws_env, photo, tmp_path):
    # Large real photos keep the first run busy long enough to interrupt it.
    for number in range(12):
        s3.put_object(Bucket=bucket, Key=f"original/big/p{number:02d}.jpg", Body=photo)
    env = {**os.environ, **FAKE_CREDENTIALS, "AWS_ENDPOINT_URL": aws_env, "PROXY_STORAGE": f"s3://{bucket}"}
    command = [sys.executable, "-m", "proxy", "backfill", "--concurrency", "1"]

    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not variant_keys(s3, bucket) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    made_before = len(variant_keys(s3, bucket))

    rerun = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)

    assert process.returncode == 130
    assert b"run the same command again" in stderr
    assert 0 < made_before < 12 * len(SIZES)
    assert rerun.returncode == 0
    assert len(variant_keys(s3, bucket)) == 12 * len(SIZES)
    for number in range(12):
        body = s3.get_object(Bucket=bucket, Key=f"r/big/p{number:02d}-2200.webp")["Body"].read()
        assert decode(body).width == min(2200, decode(photo).width)

