"""The processing deadline, the frame cap and the malloc arena cap."""

import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest
import pyvips
from conftest import CountingStore, decode, make_image, running_app
from event_documents import s3_notification, s3_record
from PIL import Image
from test_inputs import pillow_bytes

from proxy import imaging
from proxy.errors import ProcessingTimedOut, SourceTooLarge
from proxy.store import open_store
from proxy.uploads import FAILED, MADE, UploadHandler

ALL_SIZES = [(width, fmt) for width in (360, 720, 1200, 2200) for fmt in ("jpg", "webp")]


def large_png() -> bytes:
    """A 9000×9000 single-colour PNG: about 1 MB, but 81 megapixels to decode.

    On a busy 2-core machine, a variant of it took about 0.5 s and one of a
    64×32 image 6 ms, so a deadline of 0.1 s stops the first and lets the
    second through.
    """
    return pyvips.Image.black(9000, 9000).new_from_image([30, 120, 200]).copy(interpretation="srgb").pngsave_buffer()


def frames_gif(count: int) -> bytes:
    """A 120×80 GIF of `count` frames, the first one red."""
    frames = [Image.new("RGB", (120, 80), (255, 0, 0))]
    frames += [Image.new("RGB", (120, 80), (0, (40 * index) % 256, 255)) for index in range(1, count)]
    return pillow_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


async def handle_created(store, settings, bucket: str, key: str) -> list:
    """Handle an ObjectCreated event for `key` with one resize thread, then close `store`."""
    document = json.dumps(s3_notification(s3_record(bucket, key)))
    try:
        with ThreadPoolExecutor(max_workers=1) as executor:
            return await UploadHandler(store, settings, executor).handle_document(document)
    finally:
        await store.close()


@pytest.fixture
def kills(monkeypatch) -> list[bool]:
    """Record every call of `pyvips.Image.set_kill`, which stops a computation."""
    calls: list[bool] = []
    original = pyvips.Image.set_kill

    def recording(image, kill):
        calls.append(kill)
        return original(image, kill)

    monkeypatch.setattr(pyvips.Image, "set_kill", recording)
    return calls


# Processing deadline


@pytest.mark.parametrize("sizes", [[(720, "jpg")], ALL_SIZES], ids=["one-variant", "all-variants"])
def test_processing_past_deadline_killed(settings_for, tmp_path, kills, monkeypatch, sizes):
    settings = settings_for(storage=str(tmp_path), processing_timeout="10")
    # A clock that passes the deadline on its third reading, whatever the load of
    # the machine: the first sets the deadline, and the second is the first check
    # once libvips computes pixels (or before the first encode starts).
    readings = iter([1000.0, 1000.0])
    monkeypatch.setattr(imaging.time, "monotonic", lambda: next(readings, 2000.0))

    with pytest.raises(ProcessingTimedOut) as error:
        imaging.make_variants(large_png(), sizes, settings)

    # libvips was stopped while it computed pixels, not left to finish.
    assert True in kills
    assert "PROXY_PROCESSING_TIMEOUT" in error.value.message
    assert "10 s" in error.value.message
    assert error.value.status == 504


def test_processing_within_deadline_not_killed(settings_for, tmp_path, kills):
    settings = settings_for(storage=str(tmp_path))

    results = imaging.make_variants(large_png(), ALL_SIZES, settings)

    assert [(result.width, result.content_type) for result in results][:2] == [
        (360, "image/jpeg"),
        (360, "image/webp"),
    ]
    assert kills == []


def test_deadline_checked_between_variants(settings_for, tmp_path, monkeypatch):
    # An encode that reports no progress, as AVIF does once its pixels are
    # computed, cannot be killed, so the deadline is checked after each variant.
    settings = settings_for(storage=str(tmp_path), processing_timeout="0.5")
    encode = imaging._encode
    clock = [1000.0]
    monkeypatch.setattr(imaging.time, "monotonic", lambda: clock[0])

    def slow_encode(image, output_format, settings):
        clock[0] += 0.4
        return encode(image, output_format, settings)

    monkeypatch.setattr(imaging, "_encode", slow_encode)

    with pytest.raises(ProcessingTimedOut):
        imaging.make_variants(make_image(400, 300), ALL_SIZES, settings)

    assert clock[0] == pytest.approx(1000.8)


async def test_request_past_deadline_504_and_not_stored(s3, bucket, settings_for):
    settings = settings_for(storage=f"s3://{bucket}", processing_timeout="0.1")
    s3.put_object(Bucket=bucket, Key="original/large.png", Body=large_png())
    s3.put_object(Bucket=bucket, Key="original/small.png", Body=make_image(64, 32, ".png"))

    async with running_app(settings) as client:
        slow = await client.get("/r/large-720.jpg")
        small = await client.get("/r/small-360.jpg")

    listing = s3.list_objects_v2(Bucket=bucket, Prefix="r/")
    assert slow.status_code == 504
    assert "PROXY_PROCESSING_TIMEOUT" in slow.text
    assert slow.headers["cache-control"] == "no-store"
    # The resize thread is free again and the next variant is made.
    assert small.status_code == 200
    assert (decode(small.content).width, decode(small.content).height) == (64, 32)
    assert [item["Key"] for item in listing.get("Contents", [])] == ["r/small-360.jpg"]


async def test_upload_past_deadline_fails_without_writes(s3, bucket, settings_for):
    settings = settings_for(storage=f"s3://{bucket}", processing_timeout="0.1")
    s3.put_object(Bucket=bucket, Key="original/large.png", Body=large_png())
    store = CountingStore(await open_store(settings))
    outcomes = await handle_created(store, settings, bucket, "original/large.png")

    assert [outcome.result for outcome in outcomes] == [FAILED]
    assert "PROXY_PROCESSING_TIMEOUT" in outcomes[0].reason
    assert store.count("put") == 0


async def test_preview_past_deadline_504(s3, bucket, settings_for):
    settings = settings_for(storage=f"s3://{bucket}", processing_timeout="0.1")
    s3.put_object(Bucket=bucket, Key="original/large.png", Body=large_png())

    async with running_app(settings) as client:
        response = await client.get("/preview/original/large.png")

    assert response.status_code == 504
    assert "PROXY_PROCESSING_TIMEOUT" in response.text


# Frame cap


def test_frame_count_over_cap_rejected(settings_for, tmp_path):
    settings = settings_for(storage=str(tmp_path), max_frames="2")

    with pytest.raises(SourceTooLarge) as error:
        imaging.make_variant(frames_gif(3), 360, "jpg", settings)

    assert "3 frames" in error.value.message
    assert "PROXY_MAX_FRAMES" in error.value.message


def test_frame_count_at_cap_gives_first_frame(settings_for, tmp_path):
    settings = settings_for(storage=str(tmp_path), max_frames="3")

    result = imaging.make_variant(frames_gif(3), 360, "png", settings)

    image = decode(result.body)
    assert image.get_typeof("n-pages") == 0 or image.get("n-pages") == 1
    assert image.extract_band(0).avg() > 240
    assert image.extract_band(2).avg() < 15


def test_single_frame_cap_rejects_animation(settings_for, tmp_path):
    settings = settings_for(storage=str(tmp_path), max_frames="1")

    with pytest.raises(SourceTooLarge):
        imaging.make_variant(frames_gif(2), 360, "jpg", settings)
    still = imaging.make_variant(frames_gif(1), 360, "jpg", settings)

    assert (still.width, still.height) == (120, 80)


async def test_animation_over_frame_cap_413_and_not_stored(s3, bucket, settings_for):
    settings = settings_for(storage=f"s3://{bucket}", max_frames="10")
    s3.put_object(Bucket=bucket, Key="original/long.gif", Body=frames_gif(11))

    async with running_app(settings) as client:
        response = await client.get("/r/long-360.webp")

    assert response.status_code == 413
    assert "11 frames" in response.text
    assert s3.list_objects_v2(Bucket=bucket, Prefix="r/").get("KeyCount") == 0


async def test_upload_within_frame_cap_made(s3, bucket, settings_for):
    settings = settings_for(storage=f"s3://{bucket}", max_frames="3")
    s3.put_object(Bucket=bucket, Key="original/short.gif", Body=frames_gif(3))
    outcomes = await handle_created(await open_store(settings), settings, bucket, "original/short.gif")

    assert [outcome.result for outcome in outcomes] == [MADE]


# Allocator


def run_python(code: str, **environment: str) -> str:
    """Run `code` in a fresh interpreter, with MALLOC_ARENA_MAX only as given."""
    env = {name: value for name, value in os.environ.items() if name != "MALLOC_ARENA_MAX"}
    env.update(environment)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    return result.stdout


# Starts 8 threads that each hold an allocation at the same moment, then prints
# how many arenas glibc's malloc_info(3) reports.
COUNT_ARENAS = """
    import ctypes, re, tempfile, threading
    import proxy.imaging

    # The main thread joins the barrier too: once it passes, every thread holds its block.
    barrier = threading.Barrier(9)
    def hold():
        block = [bytes(64) for _ in range(1000)]
        barrier.wait()
        barrier.wait()
    threads = [threading.Thread(target=hold) for _ in range(8)]
    for thread in threads:
        thread.start()
    barrier.wait()
    libc = ctypes.CDLL("libc.so.6")
    libc.fopen.restype = ctypes.c_void_p
    with tempfile.NamedTemporaryFile() as report:
        stream = libc.fopen(report.name.encode(), b"w")
        libc.malloc_info(0, ctypes.c_void_p(stream))
        libc.fclose(ctypes.c_void_p(stream))
        text = open(report.name).read()
    barrier.wait()
    for thread in threads:
        thread.join()
    print(len(re.findall(r'<heap nr="', text)))
"""


def test_malloc_arenas_capped_at_two():
    assert int(run_python(COUNT_ARENAS)) <= 2


def test_malloc_arena_variable_wins():
    # The same threads spread over more arenas when the variable allows it, which
    # shows that the count above is the cap at work.
    assert int(run_python(COUNT_ARENAS, MALLOC_ARENA_MAX="8")) > 2

