"""Classify: which of the caller's labels fits the document, with a probability per label.

Extractive strategy: each label becomes a few natural-language prompts ("This document is a
{label}."), embedded and averaged; the document is a spread-out sample of its sentences. A label's
score is the mean of its best-matching sentences' similarities (what the relevant parts of the
document say), turned into probabilities by a temperature softmax (single label) or an independent
logistic per label (multi_label). The MPT strategy scores label continuations by log-likelihood on
the shared document prefix and plugs in by engine.kind.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.tasks.progress import scaled
from pipeline.types import DocumentText

PROMPTS = ("{label}", "This document is a {label}.", "This text is about {label}.")
SAMPLE_SENTENCES = 96  # enough to characterize a document; bounds the cost on very long ones
TOP_FRACTION = 0.2  # a label is judged on its best-matching fifth of the sample
TEMPERATURE = 0.02  # cosine gaps between labels are a few hundredths
MULTI_LABEL_MARGIN = 0.03  # multi_label: a label within this of the best one is about as likely


def run(engine, doc: DocumentText, params: dict[str, Any], progress) -> dict[str, Any]:
    labels = params["labels"]
    sample = _spread(len(engine.document(doc).sentences), SAMPLE_SENTENCES)
    _, vectors = engine.sentence_vectors(doc, sample, progress=scaled(progress, 0.0, 0.85, "embedding"))
    progress(0.9, "scoring")
    similarity = label_similarity(engine, labels, vectors)  # [L]
    if params["multi_label"]:
        # A logistic per label, relative to the best one (0.5 at MULTI_LABEL_MARGIN below it): cosine
        # similarities carry no absolute calibration, so "fits" can only mean "fits about as well".
        threshold = similarity.max() - MULTI_LABEL_MARGIN
        probs = 1.0 / (1.0 + np.exp(-(similarity - threshold) / TEMPERATURE))
        ranked = [labels[i] for i in np.argsort(-probs)]
        chosen = [label for label in ranked if probs[labels.index(label)] >= 0.5]
    else:
        logits = (similarity - similarity.max()) / TEMPERATURE
        probs = np.exp(logits) / np.exp(logits).sum()
        ranked = [labels[i] for i in np.argsort(-probs)]
        chosen = ranked[:1]
    scores = {label: round(float(p), 4) for label, p in zip(labels, probs, strict=True)}
    return {"label": ranked[0], "labels": chosen, "scores": scores, "method": "extractive",
            "engine": engine.kind, "model": engine.model_name}


def label_similarity(engine, labels: list[str], vectors: np.ndarray) -> np.ndarray:
    """[L] mean cosine of each label's prompt embedding to its best-matching document sentences."""
    prompts = [p.format(label=label) for label in labels for p in PROMPTS]
    prompt_vectors = engine.embed(prompts).reshape(len(labels), len(PROMPTS), -1)  # [L, P, D]
    label_vectors = prompt_vectors.mean(axis=1)  # [L, D]
    label_vectors /= np.linalg.norm(label_vectors, axis=1, keepdims=True).clip(min=1e-9)
    if len(vectors) == 0:
        return np.zeros(len(labels), dtype=np.float32)
    sims = vectors @ label_vectors.T  # [S, L]
    k = max(1, int(round(TOP_FRACTION * len(vectors))))
    top = -np.sort(-sims, axis=0)[:k]  # [k, L] best sentences per label
    return top.mean(axis=0)


def _spread(n: int, limit: int) -> list[int]:
    """Up to `limit` indices spread evenly over range(n), so long documents are sampled end to end."""
    if n <= limit:
        return list(range(n))
    return sorted({int(i) for i in np.linspace(0, n - 1, limit)})
