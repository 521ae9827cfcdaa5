"""Summarize (extractive): the document's own sentences, central and mutually diverse, in reading order,
within the word budget; each cites its pages.

Centrality is lexical: cosine of a sentence's tf-idf vector (stemmed BM25 terms) to the document's
tf-idf centroid, what the document is mostly about, plus a small preference for early sentences
(documents state their parties and purpose first) and, with `focus`, the sentence's BM25 match to the
focus. Sentences are then picked greedily by maximal marginal relevance so the summary covers
different topics instead of repeating the most central one. No embedding is needed: on a 68-page
contract this strategy costs ~0.1 s where embedding every sentence cost ~20 s (bench/RESULTS.md).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from scipy import sparse

from pipeline.tasks.extractive.segments import count_words, first_words
from pipeline.tasks.retrieval import terms
from pipeline.tasks.schemas import SummarizeParams
from pipeline.types import DocumentText

MMR_LAMBDA = 0.7  # weight of centrality vs. novelty w.r.t. sentences already chosen
MIN_SUMMARY_SENTENCE_WORDS = 8  # shorter segments are headings and fragments, rarely a summary
NEAR_DUPLICATE = 0.8  # tf-idf cosine above which a sentence only repeats one already chosen
LEAD_BONUS = 0.08
FOCUS_WEIGHT = 0.5
_COMPLETE = re.compile(r"^[\"'“‘(]?[A-Z0-9].*[.!?:;][\"'”’)]?$")  # starts like and ends like a sentence


def run(engine, doc: DocumentText, params: dict[str, Any], progress) -> dict[str, Any]:  # noqa: ANN001
    max_words = SummarizeParams.model_validate(params).word_budget()
    progress(0.1, "indexing")
    index = engine.document(doc)
    sentences = index.sentences
    eligible = [s.words >= MIN_SUMMARY_SENTENCE_WORDS and bool(_COMPLETE.match(s.text)) for s in sentences]
    focus = index.retriever.bm25.scores(params["focus"]) if params.get("focus") else None
    progress(0.5, "selecting")
    chosen = select([s.text for s in sentences], eligible, max_words, focus, index.retriever.bm25.terms,
                    [s.words for s in sentences])
    picked = [sentences[i].citation() for i in sorted(chosen)]
    if len(chosen) == 1 and sentences[chosen[0]].words > max_words:
        picked[0]["text"] = first_words(picked[0]["text"], max_words)  # a prefix: still on the cited page
    texts = [p.pop("text") for p in picked]
    summary = "\n".join(f"- {t}" for t in texts) if params.get("style") == "bullets" else " ".join(texts)
    return {"summary": summary, "method": "extractive", "engine": engine.kind, "model": engine.model_name,
            "tokens_in": doc.token_count, "tokens_out": engine.count_tokens(summary),
            "citations": [{**p, "sentence": i} for i, p in enumerate(picked)]}


def tfidf(texts: list[str], corpus_terms: list[list[str]] | None = None) -> sparse.csr_matrix:
    """[S, V] L2-normalized sublinear tf-idf rows over stemmed terms (corpus_terms: each text's terms
    when the caller has them, as the document's BM25 index does)."""
    rows, cols, tfs, vocab = [], [], [], {}
    for r, text in enumerate(texts):
        counts: dict[int, int] = {}
        for term in (terms(text) if corpus_terms is None else corpus_terms[r]):
            c = vocab.setdefault(term, len(vocab))
            counts[c] = counts.get(c, 0) + 1
        rows += [r] * len(counts)
        cols += counts
        tfs += counts.values()
    values = 1.0 + np.log(np.array(tfs, dtype=np.float64))  # one call, not one per term (~15 ms a contract)
    matrix = sparse.csr_matrix((values, (rows, cols)), shape=(len(texts), max(1, len(vocab))), dtype=np.float32)
    df = np.bincount(matrix.indices, minlength=matrix.shape[1])  # [V] sentences per term
    matrix = matrix @ sparse.diags(np.log((1 + len(texts)) / (1 + df)) + 1.0)
    norms = np.sqrt(matrix.multiply(matrix).sum(axis=1)).A1  # [S]
    return sparse.diags(1.0 / np.clip(norms, 1e-9, None)) @ matrix


def select(texts: list[str], eligible: list[bool], max_words: int, focus: np.ndarray | None = None,
           corpus_terms: list[list[str]] | None = None, words: list[int] | None = None) -> list[int]:
    """Indices of the sentences to keep: central, mutually diverse, within max_words in total (words:
    each text's count_words, when the caller has them)."""
    n = len(texts)
    if n == 0:
        return []
    words = [count_words(t) for t in texts] if words is None else words
    candidates = [i for i in range(n) if eligible[i]] or list(range(n))
    vectors = tfidf(texts, corpus_terms)  # [S, V]
    # Repeated boilerplate (running headers, recitals copied per page) must not pull the centroid.
    unique = list({texts[i]: i for i in candidates}.values())
    centroid = np.asarray(vectors[unique].mean(axis=0)).ravel()  # [V]
    centroid /= np.linalg.norm(centroid) or 1.0
    relevance = vectors @ centroid + LEAD_BONUS * (1.0 - np.arange(n) / n)  # [S]
    if focus is not None and focus.max() > 0:
        relevance = relevance + FOCUS_WEIGHT * focus / focus.max()
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
        redundancy = np.maximum(redundancy, (vectors @ vectors[best].T).toarray().ravel())
    if not chosen:  # every sentence is longer than max_words: cut the most central one instead
        chosen = [max(candidates, key=lambda i: relevance[i])]
    return chosen
