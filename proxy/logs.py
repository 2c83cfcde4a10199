"""Log formats: plain text lines, or one JSON object per line for log collectors."""

import collections
import json
import logging
import os
import select
import threading
import time
import weakref
from datetime import datetime, timezone
from typing import TextIO


class LineFormatter(logging.Formatter):
    """A formatter whose line for a record without an error depends only on its
    time, level, logger name and message, so a line can be made without a record."""

    def line(self, created: float, levelname: str, name: str, message: str) -> str:
        raise NotImplementedError


class JsonFormatter(LineFormatter):
    """Format a record as one JSON object: time, level, logger, message and any error."""

    def format(self, record: logging.LogRecord) -> str:
        entry = self._entry(record.created, record.levelname, record.name, record.getMessage())
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # ensure_ascii keeps every line printable, whatever a key contains.
        return json.dumps(entry, ensure_ascii=True)

    def line(self, created: float, levelname: str, name: str, message: str) -> str:
        return json.dumps(self._entry(created, levelname, name, message), ensure_ascii=True)

    @staticmethod
    def _entry(created: float, levelname: str, name: str, message: str) -> dict[str, str]:
        return {
            "time": datetime.fromtimestamp(created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": levelname,
            "logger": name,
            "message": message,
        }


class TextFormatter(LineFormatter):
    """Format a record as `time level logger message`, the time as `2026-12-05 02:10:23,123`.

    The generic `logging.Formatter` parses its format string and calls
    `time.strftime` for every line. Here the time up to the second is made once
    per second, which halves the cost of formatting an access line.
    """

    def __init__(self) -> None:
        super().__init__()
        self._second: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        line = self.line(record.created, record.levelname, record.name, record.message)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{record.exc_text}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line

    def line(self, created: float, levelname: str, name: str, message: str) -> str:
        second, text = self._second
        if int(created) != second:
            second = int(created)
            text = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second))
            self._second = (second, text)
        # The milliseconds as `LogRecord` computes them from the time.
        return f"{text},{int((created - second) * 1000):03d} {levelname} {name} {message}"


def lean_log_records() -> None:
    """Stop filling the log record fields that no log format of the proxy prints.

    Looking up the caller's file and line, and the thread and process names, took
    about half the time of each access line on a 2-core test machine. This uses the switches that the
    logging HOWTO names for it, and applies to the whole process.
    """
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


# The size up to which a write to a pipe is atomic: 4096 bytes on Linux.
PIPE_BUF = getattr(select, "PIPE_BUF", 512)

# The current process's id, kept up to date across forks: `os.getpid()` is a
# system call, and the handler checks the process on every line.
_process_id = os.getpid()


def _note_fork() -> None:
    global _process_id
    _process_id = os.getpid()


os.register_at_fork(after_in_child=_note_fork)


class BufferedStreamHandler(logging.StreamHandler):
    """Write lines to a stream in batches, at most `interval` seconds late.

    A record at WARNING or above, a batch of `max_lines`, `flush()`,
    `write_through()` and the interpreter's exit write what is pending at once,
    in the order it was logged. A process that is killed loses at most the last
    `interval` seconds of lines.

    With a `LineFormatter`, `queue_info` queues a line's fields without a log
    record, and the line is formatted when the batch is written, mostly on the
    flusher thread. The access log writes its line for each request this way.
    """

    def __init__(self, stream: TextIO | None = None, interval: float = 0.1, max_lines: int = 1000) -> None:
        super().__init__(stream)
        self.interval = interval
        self.max_lines = max_lines
        # Formatted lines, or the fields of lines that `queue_info` queued. A
        # deque's append is atomic, so queueing needs no lock. Writing takes it.
        self._pending: collections.deque[str | tuple] = collections.deque()
        # Set by `write_through`: every line is then written at once.
        self.immediate = False
        _buffered_handlers.add(self)
        # The process whose flusher thread runs; a forked child starts its own.
        self._flusher_pid: int | None = None

    def emit(self, record: logging.LogRecord) -> None:
        # `Handler.handle` holds the lock while this runs.
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._append(line, urgent=record.levelno >= logging.WARNING)

    def flush(self) -> None:
        with self.lock:
            self._write_pending()

    def _append(self, entry: str | tuple, urgent: bool = False) -> None:
        """Queue `entry`, and write what is pending if it is urgent or a batch is full.

        The lock need not be held.
        """
        if self._flusher_pid != _process_id:
            self._start_flusher()
        self._pending.append(entry)
        if urgent or self.immediate or len(self._pending) >= self.max_lines:
            with self.lock:
                self._write_pending()

    def _write_pending(self) -> None:
        # The caller holds the lock. Lines queued while this runs wait for the next batch.
        pending = self._pending
        if not pending:
            return
        lines = []
        for entry in [pending.popleft() for _ in range(len(pending))]:
            if isinstance(entry, str):
                lines.append(entry)
                continue
            formatter, created, levelname, name, message, args = entry
            try:
                lines.append(formatter.line(created, levelname, name, message % args))
            except Exception:
                lines.append(formatter.line(created, levelname, name, f"{message} (unformattable arguments)"))
        try:
            # A write of at most PIPE_BUF bytes to a pipe is not interleaved with
            # other processes' writes, so workers that share standard error keep
            # their lines whole. A longer line goes in a write of its own.
            chunk: list[str] = []
            size = 0
            for line in lines:
                # UTF-8 takes at most 4 bytes a character, and an escape at most 10.
                line_size = (len(line) if line.isascii() else 10 * len(line)) + len(self.terminator)
                if chunk and size + line_size > PIPE_BUF:
                    self._write_chunk(chunk)
                    chunk, size = [], 0
                chunk.append(line)
                size += line_size
            if chunk:
                self._write_chunk(chunk)
        except Exception:
            # The stream is the log itself, so there is nowhere left to report
            # the failure. The batch is dropped and the process goes on.
            pass

    def _write_chunk(self, lines: list[str]) -> None:
        self.stream.write(self.terminator.join(lines) + self.terminator)
        super().flush()

    def _start_flusher(self) -> None:
        with self.lock:
            if self._flusher_pid == _process_id:
                return
            # Lines pending in a forked child were the parent's, and the parent writes them.
            self._pending.clear()
            self._flusher_pid = _process_id
            threading.Thread(target=self._flush_periodically, name="log-flusher", daemon=True).start()

    def _flush_periodically(self) -> None:
        # The thread wakes up every `interval` seconds whether or not lines are
        # pending, so `_append` never has to wake it.
        while True:
            time.sleep(self.interval)
            if self._pending:
                self.flush()


_buffered_handlers: "weakref.WeakSet[BufferedStreamHandler]" = weakref.WeakSet()


def write_through() -> None:
    """Write what every BufferedStreamHandler holds, and from now on each line at once.

    A worker process of `serve --workers N` ends by re-raising the SIGTERM that
    uvicorn sent it, which kills it before the interpreter's exit could flush
    the log. The app calls this when it stops, so no line is lost.
    """
    for handler in list(_buffered_handlers):
        with handler.lock:
            handler.immediate = True
            handler._write_pending()


def queue_info(logger: logging.Logger, message: str, args: tuple) -> bool:
    """Queue an INFO line of `logger`, its message being `message % args`, without
    making a log record; return whether it was queued.

    It is queued only when the line is the one that logging the record would
    give: `logger` does not propagate and its only handler is a
    `BufferedStreamHandler` with a `LineFormatter` and no filters, as `serve`
    sets up the access log. Otherwise nothing is queued, and the caller logs
    the record. Making and routing a record took about 20 µs of a 52 µs memory
    hit, timed in one process.
    """
    handlers = logger.handlers
    if len(handlers) != 1 or logger.propagate or logger.disabled or logger.filters:
        return False
    handler = handlers[0]
    if type(handler) is not BufferedStreamHandler or handler.filters or handler.level > logging.INFO:
        return False
    formatter = handler.formatter
    if not isinstance(formatter, LineFormatter) or not logger.isEnabledFor(logging.INFO):
        return False
    handler._append((formatter, time.time(), "INFO", logger.name, message, args))
    return True
