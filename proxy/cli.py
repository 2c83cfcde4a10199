"""The `resize-proxy` command."""

import argparse
import asyncio
import logging
import logging.config
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any
from urllib.parse import quote

import uvicorn
from botocore.exceptions import NoRegionError

from .backfill import BackfillReport, Progress, plan, run_backfill, summary_lines
from .errors import ProxyError
from .events import InvalidEvent
from .paths import SOURCE_EXTENSIONS
from .settings import Settings, SettingsError, load_settings
from .store import LocalStore
from .uploads import FAILED, Outcome, open_upload_handler
from .worker import QueueUnusable, run_worker

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as error:
        print(f"resize-proxy: {error}", file=sys.stderr)
        return 2
    try:
        return args.run(args, settings)
    except BrokenPipeError:
        # The reader of the output went away, as `backfill --dry-run | head` does.
        # Pointing stdout at /dev/null keeps Python's exit-time flush from failing.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resize-proxy",
        description="Resize images kept in S3 or a local folder on the fly.",
        epilog="Settings come from PROXY_* environment variables; see the README.",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument(
        "--port", type=_int_in_range(1, 65535), default=8080, help="TCP port to listen on, 1 to 65535 (default: %(default)s)"
    )
    serve.add_argument(
        "--workers",
        type=_int_in_range(1),
        default=1,
        help="worker processes, at least 1, each with its own memory cache and threads (default: %(default)s)",
    )
    serve.set_defaults(run=_serve)

    warm = commands.add_parser("warm", help="handle one S3, SNS, SQS or EventBridge event document")
    warm.add_argument("document", metavar="EVENT.json|-", help="file with the event document, or - for standard input")
    warm.set_defaults(run=_warm)

    worker = commands.add_parser("worker", help="make and delete variants from S3 events queued in SQS")
    worker.add_argument("--queue-url", required=True, help="URL of the SQS queue that receives the S3 events")
    worker.add_argument(
        "--concurrency",
        type=_int_in_range(1),
        default=4,
        help="messages handled at once, at least 1 (default: %(default)s)",
    )
    worker.add_argument(
        "--wait-seconds",
        type=int,
        default=20,
        choices=range(0, 21),
        metavar="0-20",
        help="long-poll wait of each receive, in seconds (default: %(default)s)",
    )
    worker.set_defaults(run=_worker)

    backfill = commands.add_parser("backfill", help="make the missing variants of existing sources")
    backfill.add_argument(
        "--prefix",
        default="",
        help="only sources whose key, after the source prefix, starts with this (for example trips/2024/)",
    )
    backfill.add_argument("--dry-run", action="store_true", help="report what would be made, and write nothing")
    backfill.add_argument("--force", action="store_true", help="make existing variants again too")
    backfill.add_argument(
        "--concurrency",
        type=_int_in_range(0),
        default=0,
        help="sources handled at once; 0 means the resize thread count (default: %(default)s)",
    )
    backfill.set_defaults(run=_backfill)
    return parser


def _int_in_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """Make an argparse type that accepts whole numbers from `low` to `high`, or up from `low`."""
    allowed = f"{low} to {high}" if high is not None else f"{low} or more"

    def parse(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; use {allowed}") from None
        if number < low or (high is not None and number > high):
            raise argparse.ArgumentTypeError(f"{number} is out of range; use {allowed}")
        return number

    return parse


def _configure_logging(settings: Settings) -> None:
    logging.config.dictConfig(log_config(settings.log_level, settings.log_format))


def _warm(args: argparse.Namespace, settings: Settings) -> int:
    _configure_logging(settings)
    try:
        if args.document == "-":
            document = sys.stdin.buffer.read()
        else:
            with open(args.document, "rb") as file:
                document = file.read()
    except OSError as error:
        print(f"resize-proxy: reading {args.document} failed: {error.strerror}", file=sys.stderr)
        return 2

    async def run() -> list[Outcome]:
        async with open_upload_handler(settings) as handler:
            return await handler.handle_document(document)

    try:
        outcomes = asyncio.run(run())
    except InvalidEvent as error:
        print(f"resize-proxy: {args.document}: {error}", file=sys.stderr)
        return 2
    for outcome in outcomes:
        detail = outcome.reason or f"{outcome.variants} variants"
        print(f"{outcome.result}: {outcome.key}: {detail}")
    failed = sum(1 for outcome in outcomes if outcome.result == FAILED)
    print(f"{len(outcomes)} records, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    _configure_logging(settings)
    try:
        asyncio.run(
            run_worker(settings, args.queue_url, concurrency=args.concurrency, wait_seconds=args.wait_seconds)
        )
    except QueueUnusable as error:
        print(f"resize-proxy: {error}", file=sys.stderr)
        return 1
    except NoRegionError:
        print("resize-proxy: no AWS region set; set AWS_REGION, for example AWS_REGION=eu-west-1", file=sys.stderr)
        return 2
    return 0


def _backfill(args: argparse.Namespace, settings: Settings) -> int:
    _configure_logging(settings)
    concurrency = args.concurrency or settings.thread_count
    report = BackfillReport()

    async def run() -> list[str]:
        nonlocal report
        async with open_upload_handler(settings) as handler:
            jobs, report = await plan(handler, args.prefix, force=args.force)
            if not args.dry_run:
                progress = Progress(total=report.sources)
                await run_backfill(handler, jobs, report, concurrency=concurrency, progress=progress)
            return summary_lines(report, dry_run=args.dry_run, jobs=jobs)

    try:
        lines = asyncio.run(run())
    except KeyboardInterrupt:
        print(
            f"\nresize-proxy: interrupted after {report.made} sources ({report.variants} variants), "
            f"{len(report.failures)} failed; run the same command again to make the rest",
            file=sys.stderr,
        )
        for key, reason in report.failures:
            print(f"failed: {key}: {reason}", file=sys.stderr)
        return 130
    except ProxyError as error:
        print(f"resize-proxy: backfill failed: {error.message}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 1 if report.failures else 0


class _Terminated(BaseException):
    """SIGTERM arrived while uvicorn's own handler was not installed.

    It derives from BaseException, like KeyboardInterrupt, so that the
    `except Exception` blocks in uvicorn and the app do not swallow it.
    """


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    # uvicorn (0.55 here) stops gracefully on SIGTERM, restores the handler that
    # it found and raises the signal again. The default handler then killed the
    # process, so a clean stop exited with status -15. This handler turns that
    # SIGTERM, or one that arrives before uvicorn starts, into exit status 0.
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        base_url = f"http://{_url_host(args.host)}:{args.port}"
        lines = [f"serving {settings.storage} on {base_url}/"]
        example = _example_path(settings)
        if example:
            lines.append(f"open {base_url}/{example}")
        if settings.log_format == "json":
            # Every line on standard error is then JSON, for log collectors.
            _configure_logging(settings)
            for line in lines:
                logger.info("%s", line)
        else:
            for line in lines:
                print(f"resize-proxy: {line}", file=sys.stderr)

        uvicorn.run(
            "proxy.app:serve_app",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_config=log_config(settings.log_level, settings.log_format, buffered=True),
            access_log=False,
            server_header=False,
            # The proxy reads neither the client's address nor the scheme, so
            # uvicorn's X-Forwarded-For middleware would only add work to each request.
            proxy_headers=False,
        )
    except _Terminated:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    return 0


def log_config(level: str, log_format: str = "text", *, buffered: bool = False) -> dict[str, Any]:
    """Logging set-up for uvicorn, which applies it in every worker process too.

    `buffered`, which `serve` sets, writes lines in batches at most 0.1 s late and
    lets the access log queue its lines without log records. A record and a write
    for each request took about half the time of a memory hit.
    """
    handler_class = "proxy.logs.BufferedStreamHandler" if buffered else "logging.StreamHandler"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "text": {"()": "proxy.logs.TextFormatter"},
            "json": {"()": "proxy.logs.JsonFormatter"},
        },
        "handlers": {
            "stderr": {"class": handler_class, "formatter": log_format, "stream": "ext://sys.stderr"},
        },
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            # The same handler, given to the access log directly, so that
            # `access_log` can queue its lines without making log records.
            **({"proxy.access_log": {"handlers": ["stderr"], "propagate": False}} if buffered else {}),
            "uvicorn": {"level": level},
            "botocore": {"level": "WARNING"},
            "aiobotocore": {"level": "WARNING"},
            # libvips reports every thumbnail step at INFO.
            "pyvips": {"level": "WARNING"},
        },
    }


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _example_path(settings: Settings) -> str | None:
    """Name a variant URL path of the first source in a local store, if there is one.

    The path is percent-encoded, so a file name with a space, `%`, `#` or `?`
    still gives a URL that reaches that file.
    """
    if settings.bucket is not None:
        return None
    keys = asyncio.run(LocalStore(settings.storage).list_keys(settings.source_prefix))
    for key in keys:
        stem, dot, extension = key[len(settings.source_prefix) :].rpartition(".")
        if dot and stem and extension.lower() in SOURCE_EXTENSIONS and not key.startswith(settings.variant_prefix):
            width = 720 if 720 in settings.widths else settings.widths[0]
            return quote(f"{settings.variant_prefix}{stem}-{width}.jpg", safe="/")
    return None
