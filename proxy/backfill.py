"""`resize-proxy backfill`: make the missing variants of sources already in the store.

Each variant is written whole (an S3 PUT, or a rename in a local folder), so an
interrupted run leaves only complete variants, and the next run makes the rest.
"""

import asyncio
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from .uploads import FAILED, MADE, SKIPPED, Source, UploadHandler, all_sizes, source_of


@dataclass
class BackfillReport:
    sources: int = 0
    # Sources that needed variants, and the variants made for them.
    made: int = 0
    variants: int = 0
    # Sources whose variants all exist already (or that vanished meanwhile).
    complete: int = 0
    # Keys under the source prefix that are not images.
    ignored: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def done(self) -> int:
        return self.made + self.complete + len(self.failures)


@dataclass(frozen=True)
class Job:
    source: Source
    sizes: list[tuple[int, str]]


async def plan(handler: UploadHandler, prefix: str, *, force: bool) -> tuple[list[Job], BackfillReport]:
    """List the sources under `prefix` and the variants each one lacks."""
    settings = handler.settings
    source_keys = await handler.store.list_keys(settings.source_prefix + prefix)
    existing = set(await handler.store.list_keys(settings.variant_prefix + prefix))
    sizes = all_sizes(settings)

    report = BackfillReport()
    jobs = []
    for key in source_keys:
        source = source_of(key, settings)
        if isinstance(source, str):
            report.ignored += 1
            continue
        report.sources += 1
        missing = [
            (width, fmt)
            for width, fmt in sizes
            if force or source.variant_key(settings, width, fmt) not in existing
        ]
        if missing:
            jobs.append(Job(source, missing))
        else:
            report.complete += 1
    return jobs, report


async def run_backfill(
    handler: UploadHandler,
    jobs: list[Job],
    report: BackfillReport,
    *,
    concurrency: int,
    progress: "Progress",
) -> BackfillReport:
    """Make the planned variants, `concurrency` sources at a time."""
    semaphore = asyncio.Semaphore(concurrency)

    async def run(job: Job) -> None:
        async with semaphore:
            outcome = await handler.make(job.source, job.sizes)
        if outcome.result == MADE:
            report.made += 1
            report.variants += outcome.variants
        elif outcome.result == SKIPPED:
            report.complete += 1
        elif outcome.result == FAILED:
            report.failures.append((job.source.key, outcome.reason))
        progress.update(report)

    progress.update(report)
    await asyncio.gather(*(run(job) for job in jobs))
    progress.finish(report)
    return report


class Progress:
    """A progress bar on a terminal, and a plain line every `interval` seconds otherwise."""

    BAR_WIDTH = 30

    def __init__(self, total: int, stream: TextIO = sys.stderr, interval: float = 10.0) -> None:
        self.total = total
        self.stream = stream
        self.interval = interval
        self.is_terminal = stream.isatty()
        self._last_line = 0.0

    def update(self, report: BackfillReport) -> None:
        if self.is_terminal:
            filled = self.BAR_WIDTH * report.done // max(self.total, 1)
            bar = "#" * filled + "." * (self.BAR_WIDTH - filled)
            self.stream.write(f"\r[{bar}] {self._counts(report)}")
            self.stream.flush()
            return
        now = time.monotonic()
        if now - self._last_line >= self.interval:
            self._last_line = now
            self.stream.write(f"backfill: {self._counts(report)}\n")
            self.stream.flush()

    def finish(self, report: BackfillReport) -> None:
        if self.is_terminal:
            self.stream.write("\n")
            self.stream.flush()

    def _counts(self, report: BackfillReport) -> str:
        return (
            f"{report.done}/{self.total} sources, {report.variants} variants made, "
            f"{len(report.failures)} failed"
        )


def summary_lines(report: BackfillReport, *, dry_run: bool, jobs: list[Job]) -> list[str]:
    if dry_run:
        planned = sum(len(job.sizes) for job in jobs)
        lines = [
            f"dry run: {report.sources} sources, {len(jobs)} need variants "
            f"({planned} variants), {report.complete} complete, {report.ignored} other files; "
            "nothing was written"
        ]
        lines += [f"would make {len(job.sizes)} variants of {job.source.key}" for job in jobs]
        return lines
    lines = [
        f"backfill: {report.sources} sources: {report.made} made ({report.variants} variants), "
        f"{report.complete} already complete, {len(report.failures)} failed; "
        f"{report.ignored} other files ignored"
    ]
    lines += [f"failed: {key}: {reason}" for key, reason in report.failures]
    return lines
