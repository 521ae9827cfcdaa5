"""Classify (extractive): which of the labels fits the document, with a probability per label.

Each label becomes a few prompts, embedded and averaged; the document is a spread-out sample of its
sentences, each by its first SAMPLE_WORDS words. A label's score is the mean similarity of its
best-matching fifth of the sample (what the relevant parts of the document say), turned into
probabilities by a temperature softmax (single label) or a logistic per label relative to the best
one (multi_label). The default labels (document types) use prototype sentences of each type instead
of "This document is a {label}.", and "other" wins only when no type matches the sample at least
OTHER_SIMILARITY.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.tasks.extractive.segments import first_words
from pipeline.types import DocumentText

PROMPTS = ("{label}", "This document is a {label}.", "This text is about {label}.")
DOCUMENT_TYPES = {  # prototype sentences of the default labels' document types
    "contract": ("This Agreement is entered into by and between the parties.",
                 "The Licensee shall pay the fees set forth in this Agreement.",
                 "Either party may terminate this Agreement upon written notice.",
                 "This Agreement shall be governed by the laws of the State."),
    "report": ("This report presents the results and performance for the fiscal year.",
               "Net revenue for the quarter increased compared with the prior year period.",
               "The agency's strategic goals and objectives for the period are described below.",
               "The investigation determined the probable cause of the accident."),
    "paper": ("In this paper we propose a new method and evaluate it experimentally.",
              "Our model outperforms the baselines on the benchmark datasets.",
              "We describe related work in Section 2 and conclude in Section 6.",
              "The authors thank the reviewers for their comments."),
    "form": ("Please fill in your name, address and signature.",
             "Check the box that applies and enter the date.",
             "Applicant information: name, telephone number and email address."),
}
OTHER = "other"
OTHER_SIMILARITY = 0.2  # "other" scores this: it wins when no document type matches better
SAMPLE_SENTENCES = 24  # enough to characterize a document; bounds the cost on very long ones
MIN_SAMPLE_WORDS = 6
# each sampled sentence is embedded by its first words only: the kind of document shows in how its sentences
# start, and the sample then costs 2.3x fewer tokens (its embedding was ~30% of the contract bench's model
# time). 16 words: 22/23 on the corpus; 12: 20/23, 20 and 24: 21/23, whole sentences 21/23 (bench/NOTES.md)
SAMPLE_WORDS = 16
TOP_FRACTION = 0.2
TEMPERATURE = 0.02  # cosine gaps between labels are a few hundredths
MULTI_LABEL_MARGIN = 0.03


def run(engine, doc: DocumentText, params: dict[str, Any], progress) -> dict[str, Any]:  # noqa: ANN001
    labels = params["labels"]
    sentences = engine.document(doc).sentences
    usable = [i for i, s in enumerate(sentences) if s.words >= MIN_SAMPLE_WORDS] or list(range(len(sentences)))
    sample = [usable[i] for i in _spread(len(usable), SAMPLE_SENTENCES)]
    progress(0.2, "embedding")
    vectors = engine.embed([first_words(sentences[i].text, SAMPLE_WORDS) for i in sample])  # [S, D]
    progress(0.9, "scoring")
    similarity = label_similarity(engine, labels, vectors)  # [L]
    if params["multi_label"]:
        # A logistic per label, relative to the best one (0.5 at MULTI_LABEL_MARGIN below it): cosine
        # similarities carry no absolute calibration, so "fits" can only mean "fits about as well".
        threshold = similarity.max() - MULTI_LABEL_MARGIN
        probs = 1.0 / (1.0 + np.exp(-(similarity - threshold) / TEMPERATURE))
        ranked = [labels[i] for i in np.argsort(-probs, kind="stable")]
        chosen = [label for label in ranked if probs[labels.index(label)] >= 0.5]
    else:
        logits = (similarity - similarity.max()) / TEMPERATURE
        probs = np.exp(logits) / np.exp(logits).sum()
        ranked = [labels[i] for i in np.argsort(-probs, kind="stable")]
        chosen = ranked[:1]
    scores = {label: round(float(p), 4) for label, p in zip(labels, probs, strict=True)}
    return {"label": ranked[0], "labels": chosen, "scores": scores, "method": "extractive",
            "engine": engine.kind, "model": engine.model_name}


def _prompts(label: str) -> tuple[str, ...]:
    return DOCUMENT_TYPES.get(label.casefold(), tuple(p.format(label=label) for p in PROMPTS))


def label_similarity(engine, labels: list[str], vectors: np.ndarray) -> np.ndarray:  # noqa: ANN001
    """[L] mean cosine of each label's prompt embedding to its best-matching document sentences."""
    out = np.zeros(len(labels), dtype=np.float32)
    scored = [label for label in labels if label.casefold() != OTHER]
    if len(vectors) and scored:  # every label's prompts in one call (fewer, fuller batches); cached across documents
        engine.embed(list(dict.fromkeys(p for label in scored for p in _prompts(label))))
    for li, label in enumerate(labels):
        if label.casefold() == OTHER:
            out[li] = OTHER_SIMILARITY
            continue
        if len(vectors) == 0:
            continue
        prompt_vectors = engine.embed(list(_prompts(label)))  # [P, D], from the cache
        label_vector = prompt_vectors.mean(axis=0)
        label_vector /= np.linalg.norm(label_vector) or 1.0
        sims = vectors @ label_vector  # [S]
        k = max(1, int(round(TOP_FRACTION * len(vectors))))
        out[li] = float(np.sort(sims)[-k:].mean())
    return out


def _spread(n: int, limit: int) -> list[int]:
    """Up to `limit` indices spread evenly over range(n), so long documents are sampled end to end."""
    if n <= limit:
        return list(range(n))
    return sorted({int(i) for i in np.linspace(0, n - 1, limit)})
