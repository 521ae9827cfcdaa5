"""Summarize: a summary of at most max_words words whose every sentence cites its pages.

Extractive strategy: rank sentences by centrality (cosine to the document's mean embedding: what
the document is mostly about), then pick greedily by maximal marginal relevance so the summary
covers different topics instead of repeating the most central one, and print them in reading order.
The MPT strategy (generate from the shared document prefix) plugs in beside it by engine.kind.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from pipeline.tasks.extractive.segments import count_words, first_words
from pipeline.tasks.progress import scaled
from pipeline.tasks.schemas import SummarizeParams
from pipeline.types import DocumentText

MMR_LAMBDA = 0.7  # weight of centrality vs. novelty w.r.t. sentences already chosen
MIN_SUMMARY_SENTENCE_WORDS = 8  # shorter segments are headings and fragments, rarely a summary
NEAR_DUPLICATE = 0.9  # cosine above which a sentence only repeats one already chosen
LEAD_BONUS = 0.08  # a preference for early sentences: documents state their parties and purpose first
_COMPLETE = re.compile(r"^[\"'“‘(]?[A-Z0-9].*[.!?:;][\"'”’)]?$")  # starts like and ends like a sentence


def run(engine, doc: DocumentText, params: dict[str, Any], progress) -> dict[str, Any]:
    max_words = SummarizeParams.model_validate(params).word_budget()
    sentences, vectors = engine.sentence_vectors(doc, progress=scaled(progress, 0.0, 0.9, "embedding"))
    eligible = [s.words >= MIN_SUMMARY_SENTENCE_WORDS and bool(_COMPLETE.match(s.text)) for s in sentences]
    chosen = select(vectors, [s.text for s in sentences], eligible, max_words)
    progress(0.95, "selecting")
    picked = [sentences[i].citation() for i in sorted(chosen)]
    if len(chosen) == 1 and sentences[chosen[0]].words > max_words:
        picked[0]["text"] = first_words(picked[0]["text"], max_words)  # a prefix: still on the cited page
    texts = [p.pop("text") for p in picked]
    summary = "\n".join(f"- {t}" for t in texts) if params.get("style") == "bullets" else " ".join(texts)
    return {"summary": summary, "method": "extractive", "engine": engine.kind, "model": engine.model_name,
            "tokens_in": doc.token_count, "tokens_out": engine.count_tokens(summary),
            "citations": [{**p, "sentence": i} for i, p in enumerate(picked)]}


def select(vectors: np.ndarray, texts: list[str], eligible: list[bool], max_words: int) -> list[int]:
    """Indices of the sentences to keep: central, mutually diverse, within max_words in total."""
    n = len(texts)
    words = [count_words(t) for t in texts]
    if n == 0:
        return []
    candidates = [i for i in range(n) if eligible[i]] or list(range(n))
    # Repeated boilerplate (running headers, recitals copied per page) must not pull the centroid.
    unique = list({texts[i]: i for i in candidates}.values())
    centroid = vectors[unique].mean(axis=0)  # [D]
    centroid /= np.linalg.norm(centroid) or 1.0
    relevance = vectors @ centroid + LEAD_BONUS * (1.0 - np.arange(n) / n)  # [S]
    redundancy = np.zeros(n, dtype=np.float32)  # max cosine to any chosen sentence
    chosen: list[int] = []
    budget = max_words
    open_set = set(candidates)
    while open_set:
        fitting = [i for i in open_set if words[i] <= budget and redundancy[i] < NEAR_DUPLICATE]
        if not fitting:
            break
        best = max(fitting, key=lambda i: MMR_LAMBDA * relevance[i] - (1 - MMR_LAMBDA) * redundancy[i])
        chosen.append(best)
        budget -= words[best]
        open_set.discard(best)
        redundancy = np.maximum(redundancy, vectors @ vectors[best])
    if not chosen:  # every sentence is longer than max_words: cut the most central one instead
        chosen = [max(candidates, key=lambda i: relevance[i])]
    return chosen
