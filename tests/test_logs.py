"""The buffered log handler, lines queued without log records, and the response counters."""

import io
import logging
import os
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from proxy import logs, metrics
from proxy.logs import BufferedStreamHandler, JsonFormatter, TextFormatter

# Long enough that the flusher thread never writes during a test that checks
# what is still pending.
NEVER = 3600


def buffered_logger(name: str, stream, formatter: logging.Formatter | None = None, **options) -> logging.Logger:
    """A logger that does not propagate, with a BufferedStreamHandler as its only handler."""
    logger = logging.getLogger(f"tests.logs.{name}")
    logger.handlers.clear()
    logger.filters.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = BufferedStreamHandler(stream, **options)
    handler.setFormatter(formatter or TextFormatter())
    logger.addHandler(handler)
    return logger


def test_warning_writes_pending_lines_in_order():
    stream = io.StringIO()
    logger = buffered_logger("order", stream, interval=NEVER)

    logger.info("first")
    logger.info("second")
    pending = stream.getvalue()
    logger.warning("third")

    assert pending == ""
    assert [line.rsplit(" ", 1)[1] for line in stream.getvalue().splitlines()] == ["first", "second", "third"]


def test_buffered_lines_written_without_flush():
    stream = io.StringIO()
    logger = buffered_logger("interval", stream, interval=0.05)

    logger.info("soon")
    deadline = time.monotonic() + 10
    while "soon" not in stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.02)

    assert stream.getvalue().endswith(" INFO tests.logs.interval soon\n")


def test_buffered_full_batch_written():
    stream = io.StringIO()
    logger = buffered_logger("full", stream, interval=NEVER, max_lines=3)

    logger.info("one")
    logger.info("two")
    before = stream.getvalue()
    logger.info("three")

    assert before == ""
    assert len(stream.getvalue().splitlines()) == 3


def test_buffered_flush_writes_pending():
    stream = io.StringIO()
    logger = buffered_logger("flush", stream, interval=NEVER)

    logger.info("pending")
    logger.handlers[0].flush()

    assert stream.getvalue().endswith(" pending\n")


@pytest.mark.parametrize("formatter_class", [TextFormatter, JsonFormatter])
def test_queued_line_matches_logged_record(formatter_class, monkeypatch):
    stream = io.StringIO()
    formatter = formatter_class()
    logger = buffered_logger(f"same-{formatter_class.__name__}", stream, formatter, interval=NEVER)
    created = 1764900001.25
    monkeypatch.setattr(logs.time, "time", lambda: created)

    assert logs.queue_info(logger, "request id=%s status=%d ms=%.1f", ("abc", 200, 1.25))
    logger.handlers[0].flush()

    record = logging.LogRecord(logger.name, logging.INFO, __file__, 1, "request id=%s status=%d ms=%.1f", ("abc", 200, 1.25), None)
    record.created = created
    record.msecs = 250.0
    assert stream.getvalue() == formatter.format(record) + "\n"


def test_queue_info_declines_other_setups():
    stream = io.StringIO()
    logger = buffered_logger("declines", stream, interval=NEVER)
    assert logs.queue_info(logger, "%s", ("queued",))

    logger.propagate = True
    assert not logs.queue_info(logger, "%s", ("propagating",))
    logger.propagate = False

    logger.setLevel(logging.WARNING)
    assert not logs.queue_info(logger, "%s", ("below the level",))
    logger.setLevel(logging.INFO)

    logger.addFilter(lambda record: True)
    assert not logs.queue_info(logger, "%s", ("filtered",))
    logger.filters.clear()

    logger.handlers[0].setFormatter(logging.Formatter("%(message)s"))
    assert not logs.queue_info(logger, "%s", ("generic formatter",))
    logger.handlers[0].setFormatter(TextFormatter())

    logger.addHandler(logging.StreamHandler(io.StringIO()))
    assert not logs.queue_info(logger, "%s", ("second handler",))
    logger.handlers.pop()

    logger.handlers[0].flush()
    assert [line.rsplit(" ", 1)[1] for line in stream.getvalue().splitlines()] == ["queued"]


def test_unformattable_queued_line_still_written():
    stream = io.StringIO()
    logger = buffered_logger("unformattable", stream, interval=NEVER)

    logs.queue_info(logger, "count=%d", ("not a number",))
    logger.info("after")
    logger.handlers[0].flush()

    lines = stream.getvalue().splitlines()
    assert lines[0].endswith("count=%d (unformattable arguments)")
    assert lines[1].endswith(" after")


def test_threaded_lines_written_once():
    stream = io.StringIO()
    # Small batches and a short interval, so that writes run while other threads queue.
    logger = buffered_logger("threads", stream, interval=0.001, max_lines=7)

    def queue(thread: int) -> None:
        for number in range(2000):
            logs.queue_info(logger, "thread=%d line=%d", (thread, number))

    threads = [threading.Thread(target=queue, args=(thread,)) for thread in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    logger.handlers[0].flush()

    lines = [line.split(" tests.logs.threads ", 1)[1] for line in stream.getvalue().splitlines()]
    assert sorted(lines) == sorted(f"thread={thread} line={number}" for thread in range(4) for number in range(2000))
    for thread in range(4):
        numbers = [int(line.split("line=")[1]) for line in lines if line.startswith(f"thread={thread} ")]
        assert numbers == sorted(numbers)


def test_forked_child_drops_parent_lines(tmp_path):
    path = tmp_path / "log.txt"
    with path.open("a") as stream:
        logger = buffered_logger("fork", stream, interval=NEVER)
        logger.info("parent before fork")
        child = os.fork()
        if child == 0:
            try:
                logger.info("child")
                logger.handlers[0].flush()
            finally:
                os._exit(0)
        os.waitpid(child, 0)
        logger.handlers[0].flush()

    messages = [line.split(" tests.logs.fork ", 1)[1] for line in path.read_text().splitlines()]
    assert sorted(messages) == ["child", "parent before fork"]


def test_response_counters_exported_as_counters():
    registry = CollectorRegistry()
    counters = metrics.ResponseCounters(registry)

    counters.count("variant", 200, "memory", 1000)
    counters.count("variant", 200, "generated", 500)
    counters.count("other", 404, None, 12)

    page = generate_latest(registry).decode()
    assert '# TYPE resize_proxy_requests_total counter' in page
    assert 'resize_proxy_requests_total{route="variant",status="200"} 2.0' in page
    assert 'resize_proxy_requests_total{route="other",status="404"} 1.0' in page
    assert 'resize_proxy_variants_served_total{layer="memory"} 1.0' in page
    assert 'resize_proxy_variants_served_total{layer="generated"} 1.0' in page
    assert "resize_proxy_response_bytes_total 1512.0" in page


class RecordingStream:
    """A text stream that keeps each write, as the system call it flushes to."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_batch_written_in_pipe_sized_chunks():
    stream = RecordingStream()
    logger = buffered_logger("chunks", stream, interval=NEVER)

    for number in range(200):
        logger.info("line %03d %s", number, "x" * 80)
    logger.info("accent é")
    logger.handlers[0].flush()

    assert len(stream.writes) > 1
    assert all(len(text.encode()) <= logs.PIPE_BUF for text in stream.writes)
    assert all(text.endswith("\n") for text in stream.writes)
    lines = "".join(stream.writes).splitlines()
    assert [line.split(" ")[5] for line in lines[:200]] == [f"{number:03d}" for number in range(200)]
    assert lines[200].endswith("accent é")
