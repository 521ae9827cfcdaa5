"""Running documents' jobs through our MPT strategies for bench/tasks_mpt.py, the way a gpu worker does:
each document's jobs at once (one thread per job, all calling pipeline.tasks.run_task on one engine),
several documents in flight (bounded), the next one started as soon as one finishes.

Recorder   the serving engine as the strategies see it, recording what each job generated and
           (force_full) running every generation to its token limit, so random weights cannot end a
           summary after three tokens on one side and not the other
shuffled   a document with its words shuffled: the same shapes, no KV block shared with the real one
GpuSampler NVML's GPU utilization sampled while a run goes on (None off CUDA or without NVML)
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import torch

from pipeline.engine.core.requests import GenerateRequest
from pipeline.tasks import run_task
from pipeline.types import DocumentText, PipelineError

log = logging.getLogger("bench.tasks_run")
_SPACE = re.compile(r"(\s+)")


class Recorder:
    """A ServingEngine proxy: submit() records, per (document, task) of the calling thread, each
    generation's token count in submission order; everything else passes through."""

    def __init__(self, serving: Any, *, force_full: bool, max_new_cap: int | None = None) -> None:
        self.serving, self.force_full, self.max_new_cap = serving, force_full, max_new_cap
        self.local = threading.local()
        self.generated: dict[tuple[str, str], list[int | None]] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:  # tokenizer, max_model_len, model_name, cancel, stats
        return getattr(self.serving, name)

    def submit(self, request: Any, on_done: Any = None) -> Future:
        key = getattr(self.local, "key", ("?", "?"))
        if isinstance(request, GenerateRequest):
            params = request.params
            if self.force_full:
                params = dataclasses.replace(params, stop=(), stop_at_eos=False, stop_token_ids=())
            if self.max_new_cap is not None:  # CPU smoke: short generations, the same code paths
                params = dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens, self.max_new_cap))
            request = dataclasses.replace(request, params=params)
            with self._lock:
                slots = self.generated.setdefault(key, [])
                slots.append(None)
                index = len(slots) - 1

            def record(fut: Future, slots: list = slots, index: int = index) -> None:
                if not fut.cancelled() and fut.exception() is None:
                    slots[index] = len(fut.result().tokens)

            fut = self.serving.submit(request, on_done)
            fut.add_done_callback(record)
            return fut
        return self.serving.submit(request, on_done)


def shuffled(doc: DocumentText, seed: int = 0) -> DocumentText:
    """`doc` with its words in a random order (whitespace kept in place, so every offset, page span and
    chunk stays valid and the token count stays about the same): a warm-up reading that shares no KV
    block with the real one (a block's key hashes every token before it, and no long run of words
    survives the shuffle)."""
    parts = _SPACE.split(doc.full_text)  # words at even positions, the whitespace between them at odd
    words = parts[0::2]
    random.Random(seed).shuffle(words)
    parts[0::2] = words
    text = "".join(parts)
    chunks = [dataclasses.replace(c, text=text[c.char_start:c.char_end]) for c in doc.chunks]
    return DocumentText(full_text=text, page_spans=list(doc.page_spans), chunks=chunks, token_count=doc.token_count)


class GpuSampler:
    def __init__(self, device: torch.device, period_s: float = 0.2) -> None:
        self.device, self.period_s = device, period_s
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.device.type != "cuda":
            return
        try:
            torch.cuda.utilization(self.device)
        except Exception as exc:  # noqa: BLE001 - no NVML here: the busy fraction alone is reported
            log.warning("no GPU utilization sampling: %s", exc)
            return
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self.samples.append(torch.cuda.utilization(self.device))

    def stop(self) -> float | None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return round(sum(self.samples) / len(self.samples) / 100, 3) if self.samples else None


class DocRunner:
    def __init__(self, engine: Any, recorder: Recorder, jobs: dict[str, dict], inflight: int) -> None:
        self.engine, self.recorder, self.jobs, self.inflight = engine, recorder, jobs, inflight

    def _job(self, name: str, task: str, doc: DocumentText) -> dict[str, Any]:
        self.recorder.local.key = (name, task)
        t0 = time.perf_counter()
        try:
            result = run_task(self.engine, task, self.jobs[task], doc, lambda fraction, stage: None)
            out: dict[str, Any] = {"method": result.get("method")}
            if task == "summarize":
                out["tokens_out"] = result.get("tokens_out")
        except PipelineError as exc:
            out = {"error": exc.code, "message": exc.message[:200]}
        out["s"] = round(time.perf_counter() - t0, 3)
        return out

    def _document(self, pool: ThreadPoolExecutor, meta: dict, doc: DocumentText) -> dict[str, Any]:
        t0 = time.perf_counter()
        futs = {task: pool.submit(self._job, meta["name"], task, doc) for task in self.jobs}
        tasks = {task: f.result() for task, f in futs.items()}
        gen = {task: self.recorder.generated.get((meta["name"], task), []) for task in self.jobs}
        return {"name": meta["name"], "pages": meta["pages"], "tokens": meta["tokens"],
                "wall_s": round(time.perf_counter() - t0, 3), "tasks": tasks,
                "summary_tokens_out": tasks.get("summarize", {}).get("tokens_out"),
                "qa_generated": gen.get("qa"), "generated_tokens": {t: sum(x or 0 for x in g) for t, g in gen.items()}}

    def run(self, docs: list[tuple[dict, DocumentText]], *, budget_s: float, grace_s: float) -> dict[str, Any]:
        """Every document's jobs, `inflight` documents at once; no new document after `budget_s`, and
        documents still in flight `grace_s` after that are given up on (the run returns; "gave_up")."""
        job_pool = ThreadPoolExecutor(self.inflight * len(self.jobs), thread_name_prefix="job")
        doc_pool = ThreadPoolExecutor(self.inflight, thread_name_prefix="doc")
        rows: list[dict] = []
        pending = list(docs)
        running: set[Future] = set()
        t0 = time.perf_counter()
        stopped, gave_up = None, False
        try:
            while pending or running:
                while pending and len(running) < self.inflight and time.perf_counter() - t0 < budget_s:
                    meta, doc = pending.pop(0)
                    running.add(doc_pool.submit(self._document, job_pool, meta, doc))
                if not running:
                    stopped = f"budget of {budget_s:.1f} s reached: {len(pending)} documents not started"
                    break
                left = budget_s + grace_s - (time.perf_counter() - t0)
                done, running = wait(running, timeout=max(left, 0.0), return_when=FIRST_COMPLETED)
                if not done:
                    stopped = f"documents in flight past the budget + {grace_s:.0f} s: gave up on {len(running)}"
                    gave_up = True
                    break
                rows += [f.result() for f in done]
        finally:
            wall = time.perf_counter() - t0
            doc_pool.shutdown(wait=not gave_up, cancel_futures=True)
            job_pool.shutdown(wait=not gave_up, cancel_futures=True)
        errors = [{"name": r["name"], "task": t, **v} for r in rows for t, v in r["tasks"].items() if "error" in v]
        methods: dict[str, int] = {}
        for r in rows:
            for t, v in r["tasks"].items():
                key = f"{t}:{v.get('method') or v.get('error')}"
                methods[key] = methods.get(key, 0) + 1
        gen = {t: sum(r["generated_tokens"].get(t, 0) for r in rows) for t in self.jobs}
        return {"documents_done": len(rows), "documents_asked": len(docs), "wall_s": round(wall, 3),
                "stopped": stopped, "gave_up": gave_up, "errors": errors, "methods": methods, "generated_tokens": gen,
                "per_document": rows}
