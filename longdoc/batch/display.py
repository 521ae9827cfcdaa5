"""Progress while a batch runs and the summary table after it.

On a terminal (stderr is a TTY): a rich live display, files done/failed/total, pages/s, ETA and the
files in flight with their stage; log records go through rich above it instead of tearing it. Not
on a terminal: one log line per finished file. The summary table goes to stdout either way.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from longdoc.batch.records import Record

log = logging.getLogger("longdoc.batch")


@dataclass
class Tally:
    total: int = 0  # files the walk found
    skipped: int = 0  # already had results (this key) in the journal
    to_process: int = 0  # distinct documents this run works on
    ok: int = 0  # files (paths) that end ok, this run's and the journal's
    failed: int = 0
    done_now: int = 0  # paths settled by this run (processed, identical, or known at scan)
    identical: int = 0  # paths whose results came from an identical file
    pages: int = 0  # pages processed by this run
    failures: Counter = field(default_factory=Counter)  # error code -> paths
    started: float = field(default_factory=time.monotonic)

    def count(self, record: Record, *, now: bool) -> None:
        if record["status"] == "ok":
            self.ok += 1
        else:
            self.failed += 1
            self.failures[(record.get("error") or {}).get("code", "unknown")] += 1
        if now:
            self.done_now += 1
            self.identical += record.get("duplicate_of") is not None

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


def _rate(tally: Tally) -> str:
    elapsed = max(tally.elapsed, 1e-6)
    return f"{tally.pages / elapsed:.1f} pages/s"


class PlainDisplay:
    def __init__(self) -> None:
        self.tally = Tally()

    def start(self, mode: str) -> None:
        t = self.tally
        log.info("batch (%s): %d files, %d already have results, %d documents to process",
                 mode, t.total, t.skipped, t.to_process)

    def started(self, rel: str) -> None:
        pass

    def stage(self, rel: str, text: str) -> None:
        pass

    def done(self, record: Record) -> None:
        t, error = self.tally, record.get("error")
        where = f"[{t.done_now + t.skipped}/{t.total}]"
        if error:
            log.info("%s failed %s: %s: %s", where, record["path"], error["code"], error["message"])
        else:
            extra = f" (identical to {record['duplicate_of']})" if record.get("duplicate_of") else ""
            log.info("%s ok %s, %s pages%s", where, record["path"], record.get("pages"), extra)

    def close(self) -> None:
        pass


class LiveDisplay(PlainDisplay):
    """rich's Progress bar plus a table of the files in flight, on stderr."""

    def __init__(self) -> None:
        super().__init__()
        self.console = Console(stderr=True)
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("[red]{task.fields[failed]} failed"), TextColumn("{task.fields[rate]}"),
                                 TimeRemainingColumn(), console=self.console)
        self.current: dict[str, str] = {}
        self.live = Live(Group(self.progress, self._current_table()), console=self.console,
                         refresh_per_second=4, transient=False)
        self._saved_handlers: list[logging.Handler] = []

    def _current_table(self) -> Table:
        table = Table(box=None, show_header=False, pad_edge=False)
        for rel, stage in list(self.current.items())[:8]:
            table.add_row("  [dim]" + rel, stage)
        return table

    def _refresh(self) -> None:
        t = self.tally
        self.progress.update(self.task, completed=t.done_now + t.skipped, failed=t.failed, rate=_rate(t))
        self.live.update(Group(self.progress, self._current_table()))

    def start(self, mode: str) -> None:
        t = self.tally
        self.task = self.progress.add_task(f"batch ({mode})", total=t.total, completed=t.skipped,
                                           failed=t.failed, rate="")
        root = logging.getLogger()
        self._saved_handlers = root.handlers[:]
        root.handlers = [RichHandler(console=self.console, show_path=False)]
        self.live.start()
        self._refresh()

    def started(self, rel: str) -> None:
        self.current[rel] = "parsing"
        self._refresh()

    def stage(self, rel: str, text: str) -> None:
        if rel in self.current:
            self.current[rel] = text
            self._refresh()

    def done(self, record: Record) -> None:
        self.current.pop(record["path"], None)
        if record.get("error"):
            self.console.print(f"[red]failed[/] {record['path']}: {record['error']['code']}")
        self._refresh()

    def close(self) -> None:
        self.current.clear()
        self._refresh()
        self.live.stop()
        logging.getLogger().handlers = self._saved_handlers


def make_display(live: bool | None = None) -> PlainDisplay:
    return LiveDisplay() if (sys.stderr.isatty() if live is None else live) else PlainDisplay()


def summary_table(tally: Tally, *, stopped: bool) -> Table:
    files_s = tally.done_now / max(tally.elapsed, 1e-6)
    table = Table(title="longdoc batch" + (" (stopped early)" if stopped else ""), box=box.SIMPLE,
                  show_header=False, title_justify="left")
    table.add_column(justify="left")
    table.add_column(justify="right")
    rows = [("files found", tally.total), ("ok", tally.ok), ("failed", tally.failed),
            ("already had results", tally.skipped), ("settled by this run", tally.done_now),
            ("  identical to another file", tally.identical), ("pages processed", tally.pages),
            ("time", f"{tally.elapsed:.1f} s"), ("files/s, pages/s", f"{files_s:.2f}, {_rate(tally)}")]
    pending = tally.total - tally.ok - tally.failed
    if pending:
        rows.insert(3, ("not done (run again to resume)", pending))
    for name, value in rows:
        table.add_row(name, str(value))
    for code, n in tally.failures.most_common():
        table.add_row(f"  failed: {code}", str(n))
    return table


def print_summary(tally: Tally, *, stopped: bool) -> None:
    Console(highlight=False).print(summary_table(tally, stopped=stopped))
