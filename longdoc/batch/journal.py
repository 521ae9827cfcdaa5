"""The results journal: a JSONL file, one record per line, appended as each file finishes.

Each record goes out in one write() of one complete line, then flush + fsync, so a record is either
entirely in the file or not at all; only a crash inside that write (power loss, a full disk) can
leave a partial last line, and opening the journal drops it (truncates the file to the last complete
line) before appending again. A later line for the same path supersedes an earlier one; at the end
of a run `compact` rewrites the file (temp file, fsync, rename) with the latest record per path.
An exclusive flock keeps two runs from appending to the same journal at once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Record = dict[str, Any]


class JournalBusy(RuntimeError):
    """Another process holds the journal."""


class NotAJournal(ValueError):
    """The results file holds something other than batch records."""


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, Record] = {}  # path -> latest record
        self.lines = 0  # lines in the file, superseded ones included
        self.dropped_tail = False
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise JournalBusy(f"{path} is in use by another longdoc batch") from None
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    def _load(self) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        good = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
        if good < len(data):
            log.warning("%s: dropping a partial last line (%d bytes) left by an interrupted write",
                        self.path, len(data) - good)
            os.ftruncate(self._fd, good)
            os.fsync(self._fd)
            self.dropped_tail = True
        for number, line in enumerate(data[:good].splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise NotAJournal(f"{self.path}:{number} is not a JSON record; is this a longdoc batch "
                                  "results file?") from None
            if not isinstance(record, dict) or "path" not in record:
                raise NotAJournal(f"{self.path}:{number} is not a longdoc batch record")
            self.records[record["path"]] = record
            self.lines += 1

    def append(self, record: Record) -> None:
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        written = os.write(self._fd, line)
        if written != len(line):  # a regular file only writes short when the disk is full
            raise OSError(f"short write to {self.path} ({written} of {len(line)} bytes)")
        os.fsync(self._fd)
        self.records[record["path"]] = record
        self.lines += 1

    def compact(self) -> None:
        """Rewrite the file with one line per path, sorted by path, and close the journal (a rewrite
        is the last thing a run does; it is skipped when the file already is exactly that)."""
        ordered = [self.records[p] for p in sorted(self.records)]
        if self.lines != len(ordered) or list(self.records) != sorted(self.records):
            write_atomic(self.path, (json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n"
                                     for r in ordered))
            self.records = {r["path"]: r for r in ordered}
            self.lines = len(ordered)
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def write_atomic(path: Path, lines: Iterable[str]) -> None:
    """Write `lines` to `path` through a temp file in the same directory: readers see the old file
    or the new one, never a half-written one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            for line in lines:
                f.write(line)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)
