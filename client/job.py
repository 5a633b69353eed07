"""One scoring run: resume bookkeeping, the producer/worker pipeline, signals, the summary.

Memory stays bounded whatever the number of images: one thread walks the inputs and reads files
a batch at a time into a queue that holds at most ``concurrency`` batches, and ``concurrency``
workers each have one request in flight. The only per-image state is the set of paths already
in the output file (--resume).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from client.discovery import Item, check_arguments, iter_items, true_label
from client.labels import ClassLabels
from client.output import OutputError, Row, Writer, open_writer, read_existing
from client.progress import Progress
from client.replicas import Replicas
from client.scoring import (
    FileProblem,
    Image,
    ServiceError,
    Settings,
    error_row,
    read_image_file,
)
from client.shards import Shard
from client.summary import Summary

EXIT_OK = 0  # every image of the job has predictions
EXIT_INCOMPLETE = 1  # the run finished, but some images have error rows
EXIT_USAGE = 2  # bad arguments or inputs; nothing was scored
EXIT_SERVICE = 3  # the service was unreachable, refused the key, or failed every request
EXIT_OUTPUT = 4  # the output file could not be written (disk full, ...)
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT); 143 for SIGTERM. Rows written so far are kept.


class UsageError(Exception):
    """Bad arguments or inputs, found before any request."""


@dataclass
class JobOptions:
    paths: list[str]
    settings: Settings
    out: str = "results.jsonl"
    fmt: str = "jsonl"
    labels_from_dirs: bool = False
    resume: bool = False
    overwrite: bool = False
    summary_json: str | None = None
    quiet: bool = False
    progress: bool | None = None  # None: when standard error is a terminal
    done: set[str] = field(default_factory=set)
    shard: Shard | None = None
    #: Replicas to spread the job over; empty: ``settings.url`` alone.
    urls: list[str] = field(default_factory=list)

    def replica_urls(self) -> list[str]:
        return self.urls or [self.settings.url]


def _check(opts: JobOptions) -> None:
    problems = check_arguments(opts.paths)
    if problems:
        raise UsageError("; ".join(problems))
    if opts.out == "-":
        if opts.resume:
            raise UsageError("--resume needs an --out file (it reads what an earlier run wrote)")
        return
    if os.path.isdir(opts.out):
        raise UsageError(f"--out {opts.out} is a folder; give a file name")
    parent = os.path.dirname(os.path.abspath(opts.out))
    if not os.path.isdir(parent):
        raise UsageError(f"--out {opts.out}: folder {parent} does not exist")
    has_rows = os.path.exists(opts.out) and os.path.getsize(opts.out) > 0
    if has_rows and not opts.resume and not opts.overwrite:
        raise UsageError(
            f"{opts.out} already has results; add --resume to continue that job, or "
            "--overwrite to replace it"
        )


class _Pipeline:
    def __init__(
        self, opts: JobOptions, summary: Summary, progress: Progress, writer: Writer
    ) -> None:
        self.opts = opts
        self.settings = opts.settings
        self.summary = summary
        self.progress = progress
        self.writer = writer
        self.items: Iterator[Item] = iter_items(opts.paths)
        self.labels = ClassLabels()
        self._labels_asked: asyncio.Task[list[str]] | None = None

    async def learn_labels(self, scorer: Replicas) -> None:
        """With --labels-from-dirs, learn the model's class labels once (asked as soon as the
        model's name is known), so that rows name the class (``Ankle boot``), not the folder
        (``Ankle_boot``)."""
        if not self.opts.labels_from_dirs or self.labels:
            return
        if self._labels_asked is None:
            if scorer.model is None:
                return  # no answer yet: the next batch tries again
            self._labels_asked = asyncio.ensure_future(scorer.class_labels(scorer.model))
        self.labels = ClassLabels(await asyncio.shield(self._labels_asked))

    def emit(self, rows: list[Row]) -> None:
        # Runs on the event loop only: writes never interleave, and a cancellation can only
        # happen between two batches, never in the middle of one.
        if self.labels:
            for row in rows:
                if "true_label" in row:
                    row["true_label"] = self.labels.canonical(row["true_label"])
        if self.opts.shard is not None:
            for row in rows:
                row["shard"] = str(self.opts.shard)
        self.writer.write(rows)
        for row in rows:
            self.summary.add(row)
        self.progress.update(len(rows))

    def next_batch(self) -> tuple[list[Image], list[Row], int, bool]:
        """(images to send, error rows, images skipped by --resume, inputs exhausted).
        Runs in a worker thread: walking folders and reading files block."""
        images: list[Image] = []
        rows: list[Row] = []
        skipped = 0
        size = self.settings.batch_size
        while len(images) < size and len(rows) < size:
            item = next(self.items, None)
            if item is None:
                return images, rows, skipped, True
            if self.opts.shard is not None and not self.opts.shard.holds(item.path):
                continue
            if item.path in self.opts.done:
                skipped += 1
                continue
            label = true_label(item.path) if self.opts.labels_from_dirs else None
            if item.error is not None:
                rows.append(error_row(item.path, label, *item.error, "file"))
                continue
            try:
                data = read_image_file(item.path)
            except FileProblem as p:
                rows.append(error_row(item.path, label, p.code, p.message, p.scope))
            else:
                images.append(Image(item.path, label, data))
        return images, rows, skipped, False

    async def run(self) -> None:
        settings = self.settings
        urls = self.opts.replica_urls()
        notice, on_model = self.progress.notice, self.summary.note_model
        async with Replicas.open(settings, urls, notice, on_model) as scorer:
            await scorer.wait_ready()
            if self.opts.labels_from_dirs:
                self.labels = ClassLabels(await scorer.class_labels())
            queue: asyncio.Queue[list[Image] | None] = asyncio.Queue(maxsize=settings.concurrency)
            # Consecutive failed requests that mean "the service is gone", not "a bad batch":
            # one full wave of concurrent requests plus a couple more.
            give_up_after = settings.concurrency + 2

            async def produce() -> None:
                while True:
                    images, rows, skipped, exhausted = await asyncio.to_thread(self.next_batch)
                    self.summary.skipped += skipped
                    if rows:
                        self.emit(rows)
                    if images:
                        await queue.put(images)
                    if exhausted:
                        break
                for _ in range(settings.concurrency):
                    await queue.put(None)

            async def work() -> None:
                while (batch := await queue.get()) is not None:
                    rows = await scorer.score(batch)
                    await self.learn_labels(scorer)
                    self.emit(rows)
                    if scorer.failure_streak >= give_up_after:
                        raise ServiceError(
                            f"{scorer.failure_streak} requests in a row failed (last: "
                            f"{scorer.last_failure}); stopping. Rerun with --resume when the "
                            f"service at {', '.join(urls)} works again"
                        )

            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(produce())
                    for _ in range(settings.concurrency):
                        group.create_task(work())
            except ExceptionGroup as group_error:
                # The first failure stopped the others; it is the one worth reporting.
                raise group_error.exceptions[0] from None


async def _run_with_signals(pipeline: _Pipeline, summary: Summary) -> str | None:
    """Run the pipeline; the first SIGINT/SIGTERM cancels it cleanly (a second one kills).
    Returns the name of the signal that stopped it, if any."""
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(pipeline.run())
    stopped_by: list[str] = []

    def stop(sig: signal.Signals) -> None:
        stopped_by.append(sig.name)
        summary.interrupted = True
        for s in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(s)
        task.cancel()

    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop, sig)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):
            pass  # not the main thread, or a platform without it: Ctrl-C still stops us
    try:
        await task
    except asyncio.CancelledError:
        if not stopped_by:
            raise
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
    return stopped_by[0] if stopped_by else None


def run_job(opts: JobOptions) -> int:
    """Run the job described by ``opts``; print the summary; return the exit code."""
    try:
        _check(opts)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    s = opts.settings
    summary = Summary(top_k=s.top_k, url=", ".join(opts.replica_urls()), output=opts.out)
    show_bar = opts.progress if opts.progress is not None else sys.stderr.isatty()
    progress = Progress(enabled=show_bar and not opts.quiet, quiet=opts.quiet)
    if opts.resume:
        try:
            existing = read_existing(
                opts.out, opts.fmt, s.top_k, lambda r: summary.add(r, previous=True), opts.shard
            )
        except OutputError as e:
            progress.close()
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE
        opts.done = existing.done
        if existing.kept or existing.dropped_retry:
            progress.notice(
                f"resuming {opts.out}: {existing.kept} images done, "
                f"{existing.dropped_retry} failed ones to retry"
            )
        if existing.dropped_tail:
            progress.notice(f"{opts.out}: dropped a last line cut short by the previous run")
    progress.count_in_background(opts.paths, opts.done, opts.shard)
    writer = open_writer(opts.out, opts.fmt, s.top_k, append=opts.resume, sharded=bool(opts.shard))
    code = EXIT_OK
    summary.started = time.monotonic()  # throughput counts from here, not from reading --resume
    try:
        signal_name = asyncio.run(
            _run_with_signals(_Pipeline(opts, summary, progress, writer), summary)
        )
        if signal_name is not None:
            code = 128 + int(getattr(signal, signal_name))
    except ServiceError as e:
        summary.aborted = str(e)
        code = EXIT_SERVICE
    except KeyboardInterrupt:
        summary.interrupted = True
        code = EXIT_INTERRUPTED
    except OSError as e:
        summary.aborted = f"cannot write {opts.out}: {e.strerror or e}"
        code = EXIT_OUTPUT
    finally:
        writer.close()
        progress.close()
        summary.finish()
    if code in (EXIT_SERVICE, EXIT_OUTPUT):
        print(f"error: {summary.aborted}", file=sys.stderr)
    elif code == EXIT_OK and not summary.complete:
        code = EXIT_INCOMPLETE
    if not opts.quiet:
        print(summary.to_text(), file=sys.stderr if opts.out == "-" else sys.stdout, flush=True)
    if opts.summary_json:
        report = summary.to_dict() | {"exit_code": code}
        with open(opts.summary_json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, ensure_ascii=False)
            f.write("\n")
    if summary.rows == 0 and code == EXIT_OK:
        print("error: no images found in the given paths", file=sys.stderr)
        code = EXIT_USAGE
    return code
