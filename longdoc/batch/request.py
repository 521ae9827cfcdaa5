"""The tasks a run asks for, with validated params, and the key that says "this file has results".

Task names come from pipeline.tasks (the registry); the CLI only knows which of its flags feed which
task param. A file's key is its sha256 plus a digest of the normalized params, so the same bytes
with the same request are recognised whatever their path, and a changed request reprocesses them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pipeline.tasks import TASKS, validate_params
from pipeline.types import PipelineError

# CLI flag -> (task, param). Flags name params, not tasks: the tasks themselves come from TASKS.
FLAG_PARAMS = {"question": ("qa", "questions"), "labels": ("classify", "labels"),
               "max_words": ("summarize", "max_words")}


class RequestError(ValueError):
    """The command line asks for something the tasks refuse (a usage error, exit status 2)."""


@dataclass(frozen=True)
class TaskRequest:
    params: dict[str, dict[str, Any]]  # task -> normalized params, in TASKS order

    @property
    def tasks(self) -> list[str]:
        return list(self.params)

    @property
    def digest(self) -> str:
        canonical = json.dumps(self.params, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def key(self, sha256: str) -> str:
        return f"{sha256}:{self.digest}"


def split_list(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def build_request(tasks: str | None, *, question: list[str] | None = None, labels: str | None = None,
                  max_words: int | None = None) -> TaskRequest:
    """Validated params per task: the --tasks named, plus the task each given flag feeds (as the
    upload form's question/labels fields do); without --tasks, every task whose params are complete."""
    given: dict[str, dict[str, Any]] = {task: {} for task in TASKS}
    flags = {"question": question or [], "labels": split_list(labels), "max_words": max_words}
    for flag, value in flags.items():
        task, param = FLAG_PARAMS[flag]
        if value in (None, []):
            continue
        if task not in given:
            raise RequestError(f"--{flag.replace('_', '-')} feeds the {task!r} task, which this version lacks")
        given[task][param] = value
    names = split_list(tasks)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise RequestError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    params: dict[str, dict[str, Any]] = {}
    for task in TASKS:
        try:
            normalized = validate_params(task, given[task])
        except PipelineError as exc:
            if task in names or given[task]:
                flags = [f"--{f.replace('_', '-')}" for f, (t, _) in FLAG_PARAMS.items() if t == task]
                raise RequestError(exc.message + (f" (options for {task}: {', '.join(flags)})" if flags else "")) from exc
            continue  # not asked for, and it needs params nobody gave: not a default task
        if task in names or given[task] or not names:
            params[task] = normalized
    if not params:
        raise RequestError("no task to run")
    return TaskRequest(params)
