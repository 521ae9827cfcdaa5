"""The embedded back end: parsing in parallel contained processes, the engine in this process.

`concurrency` threads each hand one document at a time to a parser child (pipeline.parse keeps one
child per concurrent caller) and chunk it; the main thread runs the engine's tasks on each parsed
document as it arrives and records it. The engine loads once, in the background while the first
files parse. At most concurrency + 1 parsed documents wait for the engine, so memory stays bounded.
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

from config.settings import Settings
from longdoc.batch import local
from longdoc.batch.passwords import Passwords
from longdoc.batch.records import Record, new_record
from longdoc.batch.request import TaskRequest
from pipeline.types import DocumentText, PipelineError

if TYPE_CHECKING:
    from longdoc.batch.runner import Batch, WorkItem

log = logging.getLogger(__name__)

WAIT_S = 0.25  # how often the main thread looks at the stop flag while it waits


class EmbeddedBackend:
    mode = "embedded"

    def __init__(self, settings: Settings, request: TaskRequest, passwords: Passwords, concurrency: int) -> None:
        self.settings, self.request, self.passwords = settings, request, passwords
        self.concurrency = max(1, concurrency)
        self._engine: Future | None = None

    def check(self) -> None:
        """Fail fast on what would fail every file: the chunker's tokenizer."""
        from longdoc.batch.runner import BatchFatal

        try:
            local.chunk_tokenizer(self.settings)
        except LookupError as exc:
            raise BatchFatal(str(exc)) from exc

    def _engine_now(self) -> Any:
        from longdoc.batch.runner import BatchFatal

        assert self._engine is not None
        try:
            return self._engine.result()
        except PipelineError as exc:
            raise BatchFatal(f"the engine cannot load: {exc.code}: {exc.message}") from exc

    def _parse(self, item: WorkItem) -> tuple[Record, DocumentText | None]:
        record = new_record(item.file, item.key)
        record["mode"] = self.mode
        doc = local.parse_into(record, item.file.path, self.settings, self.passwords.candidates(item.file.rel))
        return record, doc

    def run(self, items: list[WorkItem], batch: Batch) -> None:
        pending = deque(items)
        loader = ThreadPoolExecutor(1, thread_name_prefix="longdoc-engine-load")
        self._engine = loader.submit(local.load_engine, self.settings)
        loader.shutdown(wait=False)
        window = self.concurrency + 1
        inflight: dict[Future, WorkItem] = {}
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="longdoc-parse") as pool:
            try:
                while pending or inflight:
                    while pending and len(inflight) < window and not batch.stop.requested.is_set():
                        item = pending.popleft()
                        batch.started(item)
                        inflight[pool.submit(self._parse, item)] = item
                    if batch.stop.requested.is_set() or not inflight:
                        break  # parses in flight finish in their threads; their documents are dropped
                    done, _ = wait(inflight, timeout=WAIT_S, return_when=FIRST_COMPLETED)
                    for future in done:
                        item = inflight.pop(future)
                        record, doc = future.result()
                        if doc is not None:
                            self._run_tasks(item, record, doc, batch)
                        record["timings"]["total_s"] = round(
                            record["timings"].get("parse_s", 0) + sum(record["timings"].get("tasks_s", {}).values()), 3)
                        batch.finished(item, record)
                        if batch.stop.requested.is_set():
                            break
            finally:
                for future in inflight:
                    future.cancel()

    def _run_tasks(self, item: WorkItem, record: Record, doc: DocumentText, batch: Batch) -> None:
        batch.stage(item, "waiting for the engine")
        engine = self._engine_now()
        last = [""]

        def progress(task: str, fraction: float, stage: str) -> None:  # runs in this (the main) thread
            text = f"{task} {fraction:.0%} {stage}"
            if text != last[0]:
                last[0] = text
                batch.stage(item, text)

        local.run_tasks(engine, self.request, record, doc, progress)
