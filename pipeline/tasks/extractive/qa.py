"""QA (extractive): for each question, the document sentence that best answers it, with its evidence.

Candidates come from stemmed BM25 (pipeline/tasks/retrieval.py) over each sentence and over its
window (the sentence with its neighbours, so a clause under a "Governing Law" heading carries the
heading's terms); only those candidates are embedded. A candidate's score fuses
- BM25 of the sentence and of its window, each relative to the question's best,
- the embedding cosine between question and sentence,
- coverage: the share of the question's idf mass its window holds (all of "total revenue quarter",
  not just "revenue"),
- a cross-check of the question's numbers and names (years, "Q3", "Delaware", "NVIDIA"): a sentence
  that names a different one of the same kind loses; a question asking for an amount prefers a
  sentence that states one, a question asking when (a date, a term) one that states a date or duration.
Headings and fragments rank after every full sentence. The answer is the best sentence; evidence the
best EVIDENCE sentences; "not stated in the document" when nothing shares a term or a meaning.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from pipeline.tasks.retrieval import Bm25, terms
from pipeline.tasks.schemas import NOT_STATED
from pipeline.types import DocumentText

EVIDENCE = 3
SHORTLIST = 6  # sentences embedded per question from each of sentence and window BM25 (union)
LEAD = 3  # the opening sentences are always candidates: parties and dates live in the preamble
MIN_ANSWER_WORDS = 7  # shorter segments (headings, fragments) rank after every full sentence
WEIGHTS = {"bm25": 0.2, "window": 0.15, "cosine": 0.3, "coverage": 0.35}
ENTITY_PENALTY = 0.1  # per kind of name/number the sentence contradicts
AMOUNT_BONUS = 0.05
DATE_BONUS = 0.2
DATED_CANDIDATES = 4
EXPANSIONS = {  # question word -> how contracts and filings say it
    "expire": "term until remain effect", "assign": "assignment transfer consent",
    "exclusive": "exclusivity exclusively solely sole", "compete": "competing competitive",
    "audit": "inspect records books", "liability": "liable exceed aggregate damages",
    "insurance": "insured coverage policy", "date": "dated entered", "terminat": "termination notice",
}
NOT_STATED_BELOW = 0.25  # a best cosine this low with no shared term: the document does not say
_AMOUNT_QUESTION = re.compile(r"^\s*(how (much|many)|what (was|were|is|are) (the )?(total|amount|number))", re.I)
_AMOUNT = re.compile(r"\$\s?\d|\d[\d,.]*\s?(%|percent|million|billion|thousand|days|months|years)|\d{1,3}(,\d{3})+")
_DATE_QUESTION = re.compile(r"^\s*when\b|\bdate\b|\bexpire|\bterm of\b", re.I)
_MONTH = r"(jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?"
_DATE = re.compile(rf"\b{_MONTH}\s+\d{{1,2}}(st|nd|rd|th)?,?\s+\d{{4}}|\b\d{{1,2}}(st|nd|rd|th)?\s+(day\s+of\s+)?{_MONTH},?\s+\d{{4}}"
                   r"|\b\d{1,2}/\d{1,2}/\d{2,4}\b|\b(\d+|one|two|three|four|five|ten)\s*(\(\d+\)\s*)?(year|month)s?\b", re.I)
_MONEY = re.compile(r"\$\s?\d|\d\s?(million|billion|thousand)|\b\d{1,3}(,\d{3})+\b")
_CALENDAR_DATE = re.compile(rf"\b{_MONTH}\s+\d{{1,2}}(st|nd|rd|th)?,?\s+\d{{4}}|\b\d{{1,2}}(st|nd|rd|th)?\s+(day\s+of\s+)?"
                            rf"{_MONTH},?\s+\d{{4}}", re.I)
_DATED_AS_OF = re.compile(r"\b(dated|entered into|made|effective|executed)\b[^.;]{0,40}?\b(as of|on|this)\b[^.;]{0,12}?("
                         + _CALENDAR_DATE.pattern + ")", re.I)
_YEAR = re.compile(r"\b(19|20)\d\d\b")
_QUARTER = re.compile(r"\b(q[1-4]|first|second|third|fourth) quarter\b|\bq[1-4]\b", re.I)
_STATES = ("alabama|alaska|arizona|arkansas|california|colorado|connecticut|delaware|florida|georgia|hawaii|"
           "idaho|illinois|indiana|iowa|kansas|kentucky|louisiana|maine|maryland|massachusetts|michigan|"
           "minnesota|mississippi|missouri|montana|nebraska|nevada|ohio|oklahoma|oregon|pennsylvania|"
           "tennessee|texas|utah|vermont|virginia|washington|wisconsin|wyoming")
_STATE = re.compile(r"\b(new york|new jersey|new hampshire|new mexico|north carolina|north dakota|south carolina|"
                    r"south dakota|rhode island|west virginia|england|" + _STATES + r")\b", re.I)


def run(engine, doc: DocumentText, params: dict[str, Any], progress) -> dict[str, Any]:  # noqa: ANN001
    questions = params["questions"]
    progress(0.1, "indexing")
    index = engine.document(doc)
    sentences = index.sentences
    if not sentences:
        return _result(engine, [_not_stated(q, []) for q in questions])
    windows = _windows(engine, index)
    progress(0.2, "embedding")
    plans = [plan(index, windows, q) for q in questions]
    # one length-sorted embedding pass over every question's candidates; rank() then hits the cache
    engine.embed(list(dict.fromkeys([index.texts[i] for p in plans for i in p[3]] + questions)))
    progress(0.8, "retrieving")
    answers = []
    for qi, question in enumerate(questions):
        ranked = rank(engine, index, windows, question, plans[qi])
        evidence = [{**sentences[i].citation(), "score": round(score, 4)} for i, score, _ in ranked[:EVIDENCE]]
        if not ranked or (ranked[0][2] < NOT_STATED_BELOW and not index.retriever.bm25.scores(question).any()):
            answers.append(_not_stated(question, evidence))
        else:
            answers.append({"question": question, "answer": evidence[0]["text"], "evidence": evidence,
                            "confidence": round(min(1.0, max(0.0, ranked[0][1])), 4)})
        progress(0.8 + 0.2 * (qi + 1) / len(questions), "retrieving")
    return _result(engine, answers)


def _windows(engine, index) -> Bm25:  # noqa: ANN001
    """BM25 over each sentence with its neighbours, built once per document (cached on the index)."""
    if "qa_windows" not in index.cache:
        texts, own = index.texts, index.retriever.bm25.terms
        windows = [" ".join(texts[max(0, i - 1):i + 2]) for i in range(len(texts))]
        index.cache["qa_windows"] = Bm25(windows, corpus_terms=[
            [t for j in range(max(0, i - 1), min(len(own), i + 2)) for t in own[j]] for i in range(len(own))])
    return index.cache["qa_windows"]


def expand(question: str) -> str:
    """The question plus the words its answer usually uses instead ("expire" -> "term", "until"):
    BM25 only finds what shares a term, and clauses rarely repeat the question's verb."""
    extra = [words for key, words in EXPANSIONS.items() if key in question.lower()]
    return " ".join([question, *extra])


def _dated(index) -> list[int]:  # noqa: ANN001
    """Sentences stating a calendar date, in reading order (cached per document)."""
    if "qa_dated" not in index.cache:
        index.cache["qa_dated"] = [i for i, t in enumerate(index.texts) if _CALENDAR_DATE.search(t)]
    return index.cache["qa_dated"]


def plan(index, windows: Bm25, question: str) -> tuple[str, np.ndarray, np.ndarray, list[int]]:  # noqa: ANN001
    """(expanded query, sentence BM25 [S], window BM25 [S], candidate sentence indices)."""
    query = expand(question)
    own, ctx = index.retriever.bm25.scores(query), windows.scores(query)  # [S], [S]
    candidates = _candidates(own, ctx)
    if _DATE_QUESTION.search(question):  # the first dated sentences: the preamble's "dated as of"
        candidates += [i for i in _dated(index)[:DATED_CANDIDATES] if i not in candidates]
    return query, own, ctx, candidates


def rank(engine, index, windows: Bm25, question: str,  # noqa: ANN001
         planned: tuple[str, np.ndarray, np.ndarray, list[int]] | None = None) -> list[tuple[int, float, float]]:
    """[(sentence index, fused score, cosine)] best first; full sentences before headings/fragments."""
    query, own, ctx, candidates = planned or plan(index, windows, question)
    texts = index.texts
    vectors = engine.embed([texts[i] for i in candidates] + [question])  # [C+1, D]
    cosine = vectors[:-1] @ vectors[-1]  # [C]
    weights = _idf(windows, query)
    scored = []
    for j, i in enumerate(candidates):
        window = " ".join(texts[max(0, i - 1):i + 2])
        score = (WEIGHTS["bm25"] * _rel(own, i) + WEIGHTS["window"] * _rel(ctx, i)
                 + WEIGHTS["cosine"] * max(0.0, float(cosine[j])) + WEIGHTS["coverage"] * _coverage(weights, window)
                 + _cross_check(question, texts[i]))
        # a table row ("Total net sales 82,959 97,278") is short but states a figure: not a heading
        short = (len(texts[i].split()) < MIN_ANSWER_WORDS and not _AMOUNT.search(texts[i])) or _is_heading(texts[i])
        scored.append((short, -score, i, float(cosine[j])))
    scored.sort()
    return [(i, -neg, cos) for _, neg, i, cos in scored]


def _candidates(own: np.ndarray, ctx: np.ndarray) -> list[int]:
    picked: dict[int, None] = dict.fromkeys(range(min(LEAD, len(own))))
    for scores in (own, ctx):
        hits = np.flatnonzero(scores > 0)
        for i in hits[np.argsort(-scores[hits], kind="stable")][:SHORTLIST]:
            picked[int(i)] = None
    if len(picked) <= LEAD:  # no shared term: fall back to meaning alone over a spread sample
        n = len(own)
        picked.update(dict.fromkeys(int(i) for i in np.linspace(0, n - 1, min(n, 4 * SHORTLIST))))
    return list(picked)


def _is_heading(text: str) -> bool:
    """'8.4 Confidentiality of this Agreement and its Terms.': short, mostly capitalized words."""
    words = [w for w in text.split() if w[:1].isalpha()]
    if len(words) > 12 or not words:
        return False
    return sum(w[0].isupper() for w in words if len(w) > 3) >= 0.8 * max(1, sum(len(w) > 3 for w in words))


def _rel(scores: np.ndarray, i: int) -> float:
    top = float(scores.max())
    return float(scores[i]) / top if top > 0 else 0.0


def _idf(windows: Bm25, question: str) -> dict[str, float]:
    """The question's terms weighted by rarity in the document (a term in every window weighs ~0)."""
    df = windows.df
    n = max(1, windows.n)
    return {t: math.log(1 + n / (1 + df.get(t, 0))) for t in set(terms(question))}


def _coverage(weights: dict[str, float], text: str) -> float:
    total = sum(weights.values())
    if not total:
        return 0.0
    present = set(terms(text))
    return sum(w for t, w in weights.items() if t in present) / total


def _cross_check(question: str, sentence: str) -> float:
    """Penalize a sentence naming another year / quarter / state than the question does; favour a
    stated amount when the question asks for one."""
    score = 0.0
    for pattern in (_YEAR, _QUARTER, _STATE):
        asked = {m.group(0).lower() for m in pattern.finditer(question)}
        named = {m.group(0).lower() for m in pattern.finditer(sentence)}
        if asked and named and not asked & named:
            score -= ENTITY_PENALTY
    if _AMOUNT_QUESTION.search(question) and _MONEY.search(sentence):
        score += AMOUNT_BONUS
    if _DATE_QUESTION.search(question) and _DATE.search(sentence):
        score += DATE_BONUS
        if _DATED_AS_OF.search(sentence):  # "entered into as of December 18, 1998": the agreement's own date
            score += DATE_BONUS
    return score


def _not_stated(question: str, evidence: list[dict[str, Any]]) -> dict[str, Any]:
    return {"question": question, "answer": NOT_STATED, "evidence": evidence, "confidence": 0.0}


def _result(engine, answers: list[dict[str, Any]]) -> dict[str, Any]:  # noqa: ANN001
    return {"answers": answers, "method": "extractive", "engine": engine.kind, "model": engine.model_name}
