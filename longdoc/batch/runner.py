"""A batch run: walk and scan DIR, settle what the journal already knows, process the rest, report.

Planning: a path whose journal record has the same key (sha256 + params digest) and is final is
skipped; a file whose key already has a final record under another path (an identical file, in the
journal or earlier in this run) gets a copy of that record; files known bad from their bytes (empty,
unreadable, unsupported type) are recorded at once; every other distinct key is one work item,
processed once for all of its paths. The back end (embedded or remote) hands each finished item back
to this thread, which alone writes the journal.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from longdoc.batch import render
from longdoc.batch.display import PlainDisplay
from longdoc.batch.journal import Journal, write_atomic
from longdoc.batch.records import Record, duplicate, fail, is_final, new_record
from longdoc.batch.request import TaskRequest
from longdoc.batch.stop import INTERRUPTED_EXIT, StopSignals
from longdoc.batch.walk import ScannedFile, scan, walk

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class BatchFatal(RuntimeError):
    """Every file would fail the same way (engine, tokenizer, credentials): the batch stops."""


@dataclass
class WorkItem:
    key: str
    files: list[ScannedFile]  # identical files; files[0] is the one processed
    resume: Record | None = None  # a "submitted" journal record (remote mode polls its jobs)

    @property
    def file(self) -> ScannedFile:
        return self.files[0]


class Backend(Protocol):
    mode: str

    def run(self, items: list[WorkItem], batch: Batch) -> None:
        """Process the items, calling batch.finished(item, record) from this (the main) thread for each
        one that completes; return early once batch.stop.requested is set."""


@dataclass
class BatchOptions:
    root: Path
    out: Path
    fmt: str  # jsonl | csv | md
    journal_path: Path
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    retry_failed: bool = False


class Batch:
    def __init__(self, options: BatchOptions, request: TaskRequest, backend: Backend,
                 display: PlainDisplay, stop: StopSignals) -> None:
        self.options, self.request, self.backend, self.display, self.stop = options, request, backend, display, stop
        self.tally = display.tally
        self.overhead: Counter = Counter()  # seconds of the batch's own work, by part (bench/batch.py)
        self.journal: Journal | None = None
        self._final_by_key: dict[str, Record] = {}
        self._settled_now: list[Record] = []  # records the plan settles without processing

    @contextlib.contextmanager
    def timed(self, part: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.overhead[part] += time.perf_counter() - started

    def run(self) -> int:
        options = self.options
        self.journal = Journal(options.journal_path)
        try:
            with self.timed("walk+hash"):
                own = {p.resolve() for p in (options.out, options.journal_path)}
                files = list(scan(walk(options.root, include=options.include, exclude=options.exclude, skip=own)))
            items = self._plan(files)
            self.tally.to_process = len(items)
            with self.timed("progress"):
                self.display.start(self.backend.mode)
            try:
                for item in self._settled_now:
                    self._write(item)
                if items:
                    self.backend.run(items, self)
            finally:
                with self.timed("progress"):
                    self.display.close()
            stopped = self.stop.requested.is_set()
            with self.timed("write"):
                self.journal.compact()
                self._render()
        finally:
            self.journal.close()
        done = self.tally.ok + self.tally.failed
        if stopped and done < self.tally.total:
            return INTERRUPTED_EXIT
        return EXIT_FAILED if self.tally.failed else EXIT_OK

    def _plan(self, files: list[ScannedFile]) -> list[WorkItem]:
        assert self.journal is not None
        journal = self.journal.records
        for record in journal.values():
            if record.get("key") and is_final(record, retry_failed=self.options.retry_failed):
                self._final_by_key.setdefault(record["key"], record)
        self.tally.total = len(files)
        groups: dict[str, WorkItem] = {}
        for f in files:
            key = self.request.key(f.sha256) if f.sha256 else None
            previous = journal.get(f.rel)
            if previous and key and previous.get("key") == key and is_final(
                    previous, retry_failed=self.options.retry_failed):
                self.tally.skipped += 1
                self.tally.count(previous, now=False)
                continue
            if key is None:  # unreadable: nothing to key it by; tried again next run
                self._settled_now.append(fail(new_record(f, None), *f.error, retryable=True))
            elif key in self._final_by_key:
                self._settled_now.append(duplicate(self._final_by_key[key], f))
            elif key in groups:
                groups[key].files.append(f)
            elif f.error:
                record = fail(new_record(f, key), *f.error)
                self._final_by_key[key] = record
                self._settled_now.append(record)
            else:
                resume = previous if previous and previous.get("key") == key and \
                    previous.get("status") == "submitted" else None
                groups[key] = WorkItem(key, [f], resume)
        return list(groups.values())

    # --- called by the back ends, in the main thread ---------------------------------------------

    def started(self, item: WorkItem) -> None:
        with self.timed("progress"):
            self.display.started(item.file.rel)

    def stage(self, item: WorkItem, text: str) -> None:
        with self.timed("progress"):
            self.display.stage(item.file.rel, text)

    def submitted(self, record: Record) -> None:
        """A remote item's upload and jobs exist: journaled so a later run polls them, not re-uploads."""
        assert self.journal is not None
        with self.timed("write"):
            self.journal.append(record)

    def finished(self, item: WorkItem, record: Record) -> None:
        if record.get("key") and is_final(record):
            self._final_by_key[record["key"]] = record
        self.tally.pages += record.get("pages") or 0
        self._write(record)
        for f in item.files[1:]:
            self._write(duplicate(record, f))

    def _write(self, record: Record) -> None:
        assert self.journal is not None
        with self.timed("write"):
            self.journal.append(record)
        self.tally.count(record, now=True)
        with self.timed("progress"):
            self.display.done(record)

    def _render(self) -> None:
        assert self.journal is not None
        if self.options.fmt == "jsonl":
            return
        records: list[Any] = [self.journal.records[p] for p in sorted(self.journal.records)]
        text = render.csv_text(records) if self.options.fmt == "csv" else render.markdown_report(records)
        write_atomic(self.options.out, [text])
