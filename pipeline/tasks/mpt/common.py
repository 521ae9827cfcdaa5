"""What the three MPT strategies share: the engine seam, context budgets, passage packing, and
submitting a batch of requests and waiting for all of them.

Torch-free: the serving engine is reached only through `engine.serving` (submit / cancel /
tokenizer / max_model_len / model_name) and the request types of pipeline/engine/core/requests.py.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, as_completed
from dataclasses import dataclass
from typing import Any

from pipeline.engine.core.requests import EngineError, GenerateRequest, SamplingParams, ScoreRequest
from pipeline.tasks.mpt.prompts import PromptBuilder, TaskText, resolve_family
from pipeline.types import Chunk, DocumentText, PipelineError

log = logging.getLogger(__name__)

# EngineError codes -> the job's error code (PipelineError); anything else is the model's failure
_ERROR_CODES = {"too_long": "context_too_long"}
MIN_CONTEXT = 64  # document tokens a prompt must have room for, or the task cannot run at all


@dataclass(frozen=True)
class Session:
    """One task run's view of the engine: where to submit, how to build prompts, the context limit."""

    serving: Any  # pipeline.engine.serving.ServingEngine (or anything with its submit contract)
    builder: PromptBuilder
    max_len: int
    model_name: str
    embedder: Any  # pipeline.tasks.retrieval.Embedder for retrieval's embedding half, or None (BM25 only)

    def fits(self, context_len: int, task: TaskText, max_new: int) -> bool:
        return self.builder.overhead(task) + context_len + max_new <= self.max_len

    def budget(self, task: TaskText, max_new: int) -> int:
        """Context tokens a prompt for `task` can hold with `max_new` tokens of output;
        context_too_long when that leaves no room for a useful context (the instructions, a question
        or the labels, take nearly the whole context)."""
        room = self.max_len - self.builder.overhead(task) - max_new
        if room < MIN_CONTEXT:
            raise PipelineError("context_too_long", f"the task's instructions and output ({self.max_len - room} "
                                f"tokens) leave no room for the document in a {self.max_len}-token context")
        return room


def session(engine: Any) -> Session:
    serving = engine.serving
    tokenizer = serving.tokenizer
    # the name the checkpoint was asked for (a hub id) says more than the directory it resolved to
    model_name = str(getattr(engine, "model_name", None) or serving.model_name)
    family = resolve_family(model_name, getattr(engine, "prompt_family", None))
    eos = getattr(tokenizer, "eos_token_id", None)
    log.debug("prompt family %s for %s", family.name, model_name)
    return Session(serving, PromptBuilder(tokenizer, family, eos), int(serving.max_model_len),
                   model_name, getattr(engine, "embedder", None))


def greedy(s: Session, max_new: int, *stop: str) -> SamplingParams:
    """Greedy sampling with the task's stop strings plus the family's (and its stop token ids, once
    SamplingParams has `stop_token_ids`)."""
    extra: dict[str, Any] = {}
    if s.builder.stop_token_ids and "stop_token_ids" in {f.name for f in dataclasses.fields(SamplingParams)}:
        extra["stop_token_ids"] = s.builder.stop_token_ids
    return SamplingParams(max_new_tokens=max_new, greedy=True, stop=s.builder.stop(*stop), **extra)


def doc_chunks(doc: DocumentText) -> list[Chunk]:
    """The document's chunks; a document without any is one chunk of its whole text."""
    if doc.chunks:
        return list(doc.chunks)
    first, last = doc.pages_for(0, len(doc.full_text))
    return [Chunk(0, doc.full_text, doc.token_count, first, last, 0, len(doc.full_text))]


def merged_spans(chunks: Sequence[Chunk], text: str) -> list[tuple[int, int]]:
    """Character spans covering `chunks`, in document order, overlapping or abutting ones merged
    (chunks overlap by the chunker's overlap_tokens; only whitespace may lie between abutting ones)."""
    spans: list[list[int]] = []
    for c in sorted(chunks, key=lambda c: c.char_start):
        if spans and (c.char_start <= spans[-1][1] or not text[spans[-1][1]:c.char_start].strip()):
            spans[-1][1] = max(spans[-1][1], c.char_end)
        else:
            spans.append([c.char_start, c.char_end])
    return [(a, b) for a, b in spans]


@dataclass(frozen=True)
class Packed:
    ids: list[int]
    spans: list[tuple[int, int]]  # the document text the ids hold, in order
    chunks: list[Chunk]  # the chunks it was packed from


def pack(s: Session, doc: DocumentText, ranked: Sequence[Chunk], budget: int,
         lead_ids: Sequence[int] = ()) -> Packed:
    """The best-ranked chunks that fit `budget` tokens (after `lead_ids`, a leading part of the
    document), in document order, with a separator between non-adjacent spans."""
    sizes: dict[int, int] = {}

    def size(c: Chunk) -> int:
        if c.index not in sizes:
            sizes[c.index] = len(s.builder.context(c.text))
        return sizes[c.index]

    sep = len(s.builder.separator_ids)
    chosen: list[Chunk] = []
    used = len(lead_ids)
    for c in ranked:
        if used + size(c) + sep <= budget:
            chosen.append(c)
            used += size(c) + sep
    if not chosen and ranked and budget - len(lead_ids) - sep > 0:
        # every chunk is longer than the room left: the best one's beginning, cut at a token
        best = ranked[0]
        ids = [*lead_ids, *([*s.builder.separator_ids] if lead_ids else [])]
        ids += s.builder.context(best.text)[: budget - len(ids)]
        return Packed(ids, [(best.char_start, best.char_end)], [best])
    while True:
        spans = merged_spans(chosen, doc.full_text)
        ids = list(lead_ids)
        for a, b in spans:
            if ids:
                ids += s.builder.separator_ids
            ids += s.builder.context(doc.full_text[a:b])
        if len(ids) <= budget or not chosen:
            return Packed(ids[:budget], spans, chosen)
        chosen.pop()  # spans re-tokenized across chunk edges came out longer than their parts: drop one


def submit_all(s: Session, requests: Sequence[GenerateRequest | ScoreRequest],
               report: Callable[[float], None] | None = None) -> list[Any]:
    """Submit every request at once (the engine batches them and shares their common prefix), wait for
    all, return their results in order. An engine failure cancels the rest and becomes the job's
    PipelineError; so does an exception from `report` (a canceled job), after canceling the rest."""
    futures: list[Future] = [s.serving.submit(r) for r in requests]
    try:
        for done, future in enumerate(as_completed(futures), start=1):
            future.result()
            if report is not None:
                report(done / len(futures))
        return [f.result() for f in futures]
    except BaseException as exc:
        for request, future in zip(requests, futures, strict=True):
            if not future.done():
                s.serving.cancel(request.request_id)
        if isinstance(exc, EngineError):
            raise PipelineError(_ERROR_CODES.get(exc.code, "model_error"), exc.message) from exc
        raise


def pages_of(doc: DocumentText, char_start: int, char_end: int) -> dict[str, int]:
    first, last = doc.pages_for(char_start, char_end)
    return {"page_start": first, "page_end": last, "char_start": char_start, "char_end": char_end}
