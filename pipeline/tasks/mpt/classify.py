"""Classify on MPT: each label's log-likelihood as the answer after the document, calibrated.

No free generation: one ScoreRequest whose prefix is head + document + the question naming the
labels, the continuations being each label as this prompt family writes an answer (a lead space
after "Answer:", then the family's end-of-answer, so "report" is not scored as the start of
"reporting"). The same request on content-free documents ("N/A" and an empty one, as in Zhao et al.
2021, "Calibrate before use") measures what the prompt alone makes likely (once per engine and label
set: it does not depend on the document); the score is
    score(label) = log p(label | document) - mean over content-free c of log p(label | c)
summed over the label's tokens (see calibrated_scores for why summed, not averaged), and a softmax
over the labels gives probabilities. Deterministic: no sampling, ties keep the label order.

Long documents (method "leading_retrieval"): the first half of the context budget holds the
document's beginning (where a document says what it is), the rest the chunks that best match the
label names, in document order.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Sequence
from typing import Any

from pipeline.engine.core.requests import ScoreRequest, ScoreResult
from pipeline.tasks.mpt.common import doc_chunks, pack, session, submit_all
from pipeline.tasks.mpt.prompts import TaskText
from pipeline.tasks.mpt.retrieve import ChunkIndex
from pipeline.types import DocumentText

CONTENT_FREE = ("N/A", "")
MULTI_LABEL_RATIO = 0.5  # multi_label: every label at least this fraction as probable as the best


def classify_task(labels: Sequence[str]) -> TaskText:
    names = ", ".join(labels)
    return TaskText(f"Which one of these types best describes the document above: {names}? "
                    "Answer with the type only.",
                    f"Question: Which one of these types best describes the document above: {names}?\nAnswer:")


class _Priors:
    """The content-free prompts' label log-likelihoods per engine: they depend on the labels and the
    prompt family only, not on the document, so every document after the first skips their 2 x labels
    scoring sequences (10 prefill forwards for the default labels, a third of a document's requests)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_engine: weakref.WeakKeyDictionary[Any, dict[tuple, list[list[float]]]] = weakref.WeakKeyDictionary()

    @staticmethod
    def _key(prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]) -> tuple:
        return tuple(map(tuple, prompts)), tuple(map(tuple, continuations))

    def get(self, serving: Any, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
            ) -> list[list[float]] | None:
        with self._lock:
            return self._by_engine.get(serving, {}).get(self._key(prompts, continuations))

    def put(self, serving: Any, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
            logprobs: list[list[float]]) -> None:
        with self._lock:
            known = self._by_engine.setdefault(serving, {})
            if len(known) >= PRIORS_KEPT:  # label sets are few; a caller inventing new ones each job
                known.clear()
            known[self._key(prompts, continuations)] = logprobs


PRIORS_KEPT = 64  # label sets remembered per engine
_PRIORS = _Priors()


def calibrated_scores(doc_logprobs: Sequence[float], free_logprobs: Sequence[Sequence[float]],
                      token_counts: Sequence[int], normalize: str = "total") -> list[float]:
    """Per label: log p(label | doc) - mean_c log p(label | content-free c), in nats.

    normalize="total" keeps the sum over the label's tokens: after calibration a label's later tokens,
    nearly determined by its first one in both contexts, add about zero, so a long label is neither
    favoured nor penalized, while averaging would divide a multi-token label's evidence by its length.
    normalize="per_token" divides by the token count (for comparing with uncalibrated per-token means).
    """
    if normalize not in ("total", "per_token"):
        raise ValueError(f"normalize must be 'total' or 'per_token', not {normalize!r}")
    scores = []
    for i, lp in enumerate(doc_logprobs):
        prior = sum(f[i] for f in free_logprobs) / len(free_logprobs) if free_logprobs else 0.0
        score = lp - prior
        scores.append(score / token_counts[i] if normalize == "per_token" else score)
    return scores


def softmax(scores: Sequence[float]) -> list[float]:
    top = max(scores)
    exps = [math.exp(x - top) for x in scores]
    total = sum(exps)
    return [e / total for e in exps]


def choose(labels: Sequence[str], probs: Sequence[float], multi_label: bool) -> tuple[str, list[str]]:
    """The best label, and every chosen one (best first; ties keep label order)."""
    order = sorted(range(len(labels)), key=lambda i: -probs[i])
    best = order[0]
    if not multi_label:
        return labels[best], [labels[best]]
    return labels[best], [labels[i] for i in order if probs[i] >= MULTI_LABEL_RATIO * probs[best]]


def run(engine: Any, doc: DocumentText, params: dict[str, Any], progress) -> dict[str, Any]:
    s = session(engine)
    labels = params["labels"]
    task = classify_task(labels)
    continuations = [s.builder.label_ids(task, label) for label in labels]
    longest = max(len(c) for c in continuations)
    doc_ids = s.builder.document(doc.full_text)
    if s.fits(len(doc_ids), task, longest):
        method, context = "whole_document", doc_ids
    else:
        method = "leading_retrieval"
        budget = s.budget(task, longest)
        lead = doc_ids[: budget // 2]
        cut = len(s.builder.tokenizer.decode(lead))  # byte-level BPE decodes back to the same characters
        rest = [c for c in doc_chunks(doc) if c.char_start >= cut]
        context = pack(s, doc, ChunkIndex(s, rest).rank(" ".join(labels)), budget, lead_ids=lead).ids
    progress(0.1, "scoring")
    free_prompts = [s.builder.prompt(s.builder.context(t), task).ids for t in CONTENT_FREE]
    free = _PRIORS.get(s.serving, free_prompts, continuations)
    requests = [ScoreRequest(s.builder.prompt(context, task).ids, continuations),
                *(ScoreRequest(p, continuations) for p in (free_prompts if free is None else ()))]
    results: list[ScoreResult] = submit_all(s, requests)
    if free is None:
        free = [r.logprobs for r in results[1:]]
        _PRIORS.put(s.serving, free_prompts, continuations, free)
    progress(0.95, "calibrating")
    scores = calibrated_scores(results[0].logprobs, free, [len(c) for c in continuations])
    probs = softmax(scores)
    label, chosen = choose(labels, probs, params.get("multi_label", False))
    return {"label": label, "labels": chosen, "scores": {lb: round(p, 6) for lb, p in zip(labels, probs, strict=True)},
            "method": method, "engine": "mpt", "model": s.model_name}
