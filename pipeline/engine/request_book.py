"""The serving engine's record of submitted requests (engine thread only): what each has produced so
far, and how it ends.

A `GenerateRequest` is one scheduler sequence; a `ScoreRequest` one scoring sequence per
continuation, sharing the prefix's blocks. Sampled tokens reach `accept` one step after the step
that computed them (async scheduling, serving.py), each with the `Tracked` record that was live when
its step was launched: a request canceled, finished or resubmitted under the same id since then
gets nothing (the extra token a finished row computed is dropped here). Stop strings, end-of-text
and token limits are judged by TokenStream; a finished request's Future is resolved and its
sequences end in the scheduler (their blocks go back to the pool, still findable by content).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from pipeline.engine.core.requests import (
    EngineError,
    GenerateRequest,
    GenerateResult,
    ScoreRequest,
    ScoreResult,
)
from pipeline.engine.core.scheduler import Scheduler, Sequence
from pipeline.engine.runner import SamplingState
from pipeline.engine.stream import TokenStream
from pipeline.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Tracked:
    """One submitted request and what the engine thread accumulates for it."""

    request: GenerateRequest | ScoreRequest
    future: Future
    seq_ids: list[str]
    stream: TokenStream | None = None
    logprobs: list[float] = field(default_factory=list)
    scores: dict[str, list[float]] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)
    cached_tokens: int = 0


class RequestBook:
    def __init__(self, scheduler: Scheduler, tokenizer: Tokenizer, device: torch.device, max_model_len: int) -> None:
        self.scheduler, self.tokenizer, self.device = scheduler, tokenizer, device
        self.max_model_len = max_model_len
        self.tracked: dict[str, Tracked] = {}  # request id -> state
        self.owner: dict[str, str] = {}  # seq id -> request id
        self.sampling: dict[str, SamplingState] = {}  # seq id -> how it samples
        self.counters = {"requests": 0, "tokens_in": 0, "tokens_out": 0, "failed": 0}
        self._arrival = 0

    def of(self, seq_id: str) -> Tracked | None:
        return self.tracked.get(self.owner.get(seq_id, ""))

    def live(self, tracked: Tracked | None) -> bool:
        """Whether a record captured at launch is still the request in flight under its id."""
        return tracked is not None and self.tracked.get(tracked.request.request_id) is tracked

    # --- in -----------------------------------------------------------------------------------

    def add(self, request: GenerateRequest | ScoreRequest, future: Future) -> None:
        rid = request.request_id
        if rid in self.tracked:
            future.set_exception(EngineError("invalid_request", f"request id {rid!r} is already in flight"))
            return
        try:
            seqs = self._sequences(request)
        except EngineError as exc:
            future.set_exception(exc)
            return
        tracked = Tracked(request, future, [s.seq_id for s in seqs])
        if isinstance(request, GenerateRequest):
            tracked.stream = TokenStream(self.tokenizer, request.params)
            gen = None
            if request.params.seed is not None and not request.params.is_greedy:
                gen = torch.Generator(device=self.device).manual_seed(request.params.seed)
            self.sampling[seqs[0].seq_id] = SamplingState(request.params, gen)
        self.tracked[rid] = tracked
        self.counters["requests"] += 1
        for seq in seqs:
            self.owner[seq.seq_id] = rid
            self.counters["tokens_in"] += seq.prompt_len
            self.scheduler.add(seq)

    def _sequences(self, request: GenerateRequest | ScoreRequest) -> list[Sequence]:
        def seq(seq_id: str, ids: list[int], max_new: int, score_from: int | None) -> Sequence:
            self._arrival += 1
            return Sequence(seq_id=seq_id, token_ids=list(ids), prompt_len=len(ids), max_new_tokens=max_new,
                            score_from=score_from, arrival=self._arrival)

        if isinstance(request, GenerateRequest):
            if not request.prompt_ids:
                raise EngineError("invalid_request", "the prompt is empty")
            return [seq(request.request_id, request.prompt_ids, request.params.max_new_tokens, None)]
        if not request.prefix_ids or not request.continuations or any(not c for c in request.continuations):
            raise EngineError("invalid_request", "scoring needs a non-empty prefix and non-empty continuations")
        p = len(request.prefix_ids)
        return [seq(f"{request.request_id}/{i}", [*request.prefix_ids, *c], 0, p - 1)
                for i, c in enumerate(request.continuations)]

    # --- results of a step --------------------------------------------------------------------

    def accept(self, seq_id: str, tracked: Tracked, token: int, logprob: float) -> None:
        """A token sampled by a step launched while `tracked` was live."""
        if not self.live(tracked) or tracked.stream is None:
            return
        self.scheduler.append_token(seq_id, token)
        tracked.logprobs.append(logprob)
        self.counters["tokens_out"] += 1
        request = tracked.request
        assert isinstance(request, GenerateRequest)
        if request.on_token is not None:
            try:
                request.on_token(token)
            except Exception:  # a caller's callback must not take the engine down
                log.exception("on_token callback of %s failed", request.request_id)
        stream = tracked.stream
        stream.push(token)
        if stream.finish_reason:
            seq = self.scheduler.finish(seq_id, stream.finish_reason)
            cached = seq.num_cached if seq is not None else 0
            completion = stream.completion(len(request.prompt_ids))
            self.resolve(request.request_id, GenerateResult(
                text=completion.text, tokens=completion.tokens, finish_reason=completion.finish_reason,
                prompt_tokens=completion.prompt_tokens, cached_tokens=cached,
                logprobs=tracked.logprobs[: len(completion.tokens)]))

    def add_scores(self, seq_id: str, tracked: Tracked, values: list[float]) -> None:
        if self.live(tracked):
            tracked.scores.setdefault(seq_id, []).extend(values)

    def drop_scores(self, seq_id: str) -> None:
        """A preempted scoring sequence is recomputed from scratch: its scored positions come again."""
        tracked = self.of(seq_id)
        if tracked is not None:
            tracked.scores.pop(seq_id, None)

    def score_done(self, seq: Sequence, tracked: Tracked) -> None:
        if not self.live(tracked) or seq.seq_id in tracked.done:
            return
        tracked.done.add(seq.seq_id)
        tracked.cached_tokens += seq.num_cached
        if len(tracked.done) < len(tracked.seq_ids):
            return
        per_token = [tracked.scores.get(sid, []) for sid in tracked.seq_ids]
        self.resolve(tracked.request.request_id, ScoreResult(
            logprobs=[float(sum(t)) for t in per_token], token_logprobs=per_token,
            cached_tokens=tracked.cached_tokens))

    # --- endings ------------------------------------------------------------------------------

    def seq_failed(self, seq: Sequence) -> None:
        rid = self.owner.get(seq.seq_id)
        if rid is None or rid not in self.tracked:
            return
        reason = seq.finish_reason or "engine_error"
        if reason == "too_long":
            msg = (f"{len(seq.token_ids)} prompt tokens + {seq.max_new_tokens} new tokens do not fit the "
                   f"context of {self.max_model_len} tokens (or the KV pool)")
        else:
            msg = f"sequence {seq.seq_id} ended: {reason}"
        self.fail(rid, EngineError(reason if reason in ("too_long", "canceled") else "engine_error", msg))

    def cancel(self, request_id: str) -> None:
        if request_id in self.tracked:
            self.fail(request_id, EngineError("canceled", f"request {request_id} was canceled"))

    def fail_all(self, error: EngineError) -> None:
        for rid in list(self.tracked):
            self.fail(rid, error)

    def fail(self, rid: str, error: EngineError) -> None:
        tracked = self.tracked.get(rid)
        if tracked is None:
            return
        for sid in tracked.seq_ids:
            self.scheduler.finish(sid, error.code)
        self.counters["failed"] += 1
        self._forget(rid)
        if not tracked.future.done():
            tracked.future.set_exception(error)

    def resolve(self, rid: str, value: GenerateResult | ScoreResult) -> None:
        tracked = self.tracked.get(rid)
        if tracked is None:
            return
        for sid in tracked.seq_ids:
            self.scheduler.finish(sid, "done")
        self._forget(rid)
        if not tracked.future.done():
            tracked.future.set_result(value)

    def _forget(self, rid: str) -> None:
        tracked = self.tracked.pop(rid, None)
        if tracked is None:
            return
        for sid in tracked.seq_ids:
            self.owner.pop(sid, None)
            self.sampling.pop(sid, None)
