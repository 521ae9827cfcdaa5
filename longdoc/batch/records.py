"""The record of one file: what every output (JSONL line, CSV row, Markdown section) is made from.

    {"path", "sha256", "bytes", "key", "status": "ok" | "failed", "media_type", "pages", "tokens",
     "results": {task: result}, "error": {code, message[, task]} | null, "errors": {task: {code, message}},
     "retryable": bool, "duplicate_of": path | null, "timings": {...}}

`error` is the file's first failure (a parse failure, or the first task that failed; the other tasks'
results are kept); `retryable` marks failures of the run rather than of the file (a service that
stayed unreachable, an interrupted job): the next run tries those files again.
"""

from __future__ import annotations

import copy
from typing import Any

from longdoc.batch.walk import ScannedFile

Record = dict[str, Any]
VOLATILE = ("timings",)  # what differs between two runs that produced the same results


def new_record(f: ScannedFile, key: str | None) -> Record:
    return {"path": f.rel, "sha256": f.sha256, "bytes": f.size, "key": key, "status": "ok",
            "media_type": f.media_type, "pages": None, "tokens": None, "results": {}, "error": None, "errors": {},
            "retryable": False, "duplicate_of": None, "timings": {}}


def fail(record: Record, code: str, message: str, *, task: str | None = None,
         retryable: bool = False) -> Record:
    error = {"code": code, "message": message}
    if task is not None:
        record["errors"][task] = error
    if record["error"] is None:
        record["error"] = {**error, "task": task} if task else error
    record["status"] = "failed"
    record["retryable"] = record["retryable"] or retryable
    return record


def is_final(record: Record, *, retry_failed: bool = False) -> bool:
    """Whether a journal record settles its file: succeeded, or failed for a reason of the file."""
    if record.get("status") == "ok":
        return True
    return record.get("status") == "failed" and not record.get("retryable") and not retry_failed


def duplicate(source: Record, f: ScannedFile) -> Record:
    """The record of an identical file (same bytes, same request) reported under its own path."""
    record = copy.deepcopy(source)
    record.update(path=f.rel, bytes=f.size, duplicate_of=source.get("duplicate_of") or source["path"],
                  timings={})
    return record


def normalized(record: Record) -> Record:
    """The record without what changes from run to run (timings)."""
    return {k: v for k, v in record.items() if k not in VOLATILE}
