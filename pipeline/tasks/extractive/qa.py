"""QA (extractive): for each question, the document sentence that best answers it, with its evidence.

Every segment is first scored lexically, which costs no embedding (the per-document facts are in
qa_facts.py):
- BM25 of the sentence and of its window (the sentence, its neighbours and its section heading, so a
  clause under "2.5 Non-Compete Covenant." carries the heading's terms), each relative to the best,
- coverage: the share of the question's idf mass its window holds (all of "total revenue quarter",
  not just "revenue"),
- a cross-check of the question's numbers and names (years, "Q3", "Delaware"): a sentence that names
  a different one of the same kind loses; a question asking for an amount prefers a sentence that
  states one, a question asking when (a date, a term) one that states a date or duration, a
  who-question one naming a company ("by and between Acme Corp. and Widget Ltd.").
Only the best SHORTLIST by that score (and the opening sentences) are embedded, each with its section
title (qa_facts.section_titles), up to EMBED_WORDS words; their cosine with the question completes the
score. Headings, fragments and contents lines rank after every full sentence. The answer is the best
sentence; evidence the best EVIDENCE distinct sentences; "not stated in the document" when nothing
shares a term or a meaning.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.tasks.extractive import qa_facts
from pipeline.tasks.extractive.qa_facts import QaFacts
from pipeline.tasks.extractive.segments import first_words, whole_sentence
from pipeline.tasks.retrieval import terms
from pipeline.tasks.schemas import NOT_STATED
from pipeline.types import DocumentText

EVIDENCE = 3
WHOLE_SENTENCE_WORDS = 120  # a segment cut from a sentence this long or shorter is cited whole
# segments embedded per question, the best lexically: an answer often ranks 5th-15th lexically and only an
# embedded one can be lifted by its meaning. Since sections' titles are embedded with their segments the
# figures are flat from 5 to 8 (in-sample 44/50, held out 35-36/55, fresh 3-4/24) and drop at 4 (43/50);
# 6 is the middle of that plateau at 20% fewer model tokens than 8 (bench/NOTES.md)
SHORTLIST = 6
MEANING_SAMPLE = 24  # no shared term: segments spread over the document, compared by meaning alone
# a candidate is embedded by its first words (title included), the opening sentences whole (a preamble
# names the parties late: "by and between ..., a Delaware corporation, and ..."): a 60-word segment's tail
# cost ~8% of qa's model tokens; at 48 every quality figure held, 3 held-out answers moved (bench/NOTES.md)
EMBED_WORDS = 48
LEAD = 3  # the opening sentences are always candidates: parties and dates live in the preamble
WEIGHTS = {"bm25": 0.2, "window": 0.15, "cosine": 0.5, "coverage": 0.35}
ENTITY_PENALTY = 0.1  # per kind of name/number the sentence contradicts
AMOUNT_BONUS = 0.05
DATE_BONUS = 0.2
WHO_BONUS = 0.3  # a who-question's answer names someone: the preamble's "by and between X Inc. and Y Ltd."
EXPANSIONS = {  # question word -> how contracts and filings say it
    "expire": "term until remain effect", "assign": "assignment transfer consent",
    "exclusive": "exclusivity exclusively solely sole", "compete": "competing competitive",
    "audit": "inspect records books", "liability": "liable exceed aggregate damages",
    "insurance": "insured coverage policy", "date": "dated entered", "terminat": "termination notice",
}
NOT_STATED_BELOW = 0.25  # a best cosine this low with no shared term: the document does not say
_AMOUNT_QUESTION = re.compile(r"^\s*(how (much|many)|what (was|were|is|are) (the )?(total|amount|number))", re.I)
_DATE_QUESTION = re.compile(r"^\s*when\b|\bdate\b|\bexpire|\bterm of\b", re.I)
_WHO_QUESTION = re.compile(r"^\s*who\b", re.I)
# when it ends, not when it was made
_END_QUESTION = re.compile(r"\b(expir\w*|terminat\w*|end|ends|until|renew\w*)\b|\bterm of\b", re.I)


@dataclass
class Plan:
    query: str  # the question with its expansions
    lexical: np.ndarray  # [S] the score without the cosine
    candidates: list[int]  # what gets embedded


def run(engine, doc: DocumentText, params: dict[str, Any], progress) -> dict[str, Any]:  # noqa: ANN001
    questions = params["questions"]
    progress(0.1, "indexing")
    index = engine.document(doc)
    sentences = index.sentences
    if not sentences:
        return _result(engine, [_not_stated(q, []) for q in questions])
    facts = document_facts(index, doc)
    progress(0.2, "embedding")
    plans = [plan(index, facts, q) for q in questions]
    # one length-sorted embedding pass over every question's candidates; rank() then hits the cache
    engine.embed(list(dict.fromkeys([embedded_text(index, facts, i) for p in plans for i in p.candidates] + questions)))
    progress(0.8, "retrieving")
    answers = []
    for qi, question in enumerate(questions):
        ranked = rank(engine, index, facts, question, plans[qi])
        cited = {i: whole_sentence(doc, sentences, i, WHOLE_SENTENCE_WORDS) for i, _, _ in ranked}
        ranked = distinct({i: c.text for i, c in cited.items()}, ranked)
        evidence = [{**cited[i].citation(), "score": round(score, 4)} for i, score, _ in ranked[:EVIDENCE]]
        if not ranked or (ranked[0][2] < NOT_STATED_BELOW and not index.retriever.bm25.scores(question).any()):
            answers.append(_not_stated(question, evidence))
        else:
            answers.append({"question": question, "answer": evidence[0]["text"], "evidence": evidence,
                            "confidence": round(min(1.0, max(0.0, ranked[0][1])), 4)})
        progress(0.8 + 0.2 * (qi + 1) / len(questions), "retrieving")
    return _result(engine, answers)


def document_facts(index, doc: DocumentText) -> QaFacts:  # noqa: ANN001
    """The document's QA facts, built once per document (cached on the index)."""
    if "qa_facts" not in index.cache:
        spans = [(s.char_start, s.char_end) for s in index.sentences]
        index.cache["qa_facts"] = qa_facts.build(doc.full_text, spans, index.retriever.bm25.terms, index.texts)
    return index.cache["qa_facts"]


def expand(question: str) -> str:
    """The question plus the words its answer usually uses instead ("expire" -> "term", "until"):
    BM25 only finds what shares a term, and clauses rarely repeat the question's verb."""
    extra = [words for key, words in EXPANSIONS.items() if key in question.lower()]
    return " ".join([question, *extra])


def plan(index, facts: QaFacts, question: str) -> Plan:  # noqa: ANN001
    """Every segment's lexical score for the question and the candidates worth embedding."""
    query = expand(question)
    own, ctx = index.retriever.bm25.scores(query), facts.windows.scores(query)  # [S], [S]
    lexical = (WEIGHTS["bm25"] * _relative(own) + WEIGHTS["window"] * _relative(ctx)
               + WEIGHTS["coverage"] * coverage(facts, query) + cross_check(facts, question))  # [S]
    n = len(lexical)
    picked: dict[int, None] = dict.fromkeys(range(min(LEAD, n)))
    shares = np.flatnonzero((own > 0) | (ctx > 0))
    if len(shares):
        # full sentences first, as rank() orders them; ties keep reading order
        order = shares[np.lexsort((shares, -lexical[shares], facts.short[shares]))]
        picked.update(dict.fromkeys(int(i) for i in order[:SHORTLIST]))
    else:  # no shared term: fall back to meaning alone over a spread sample
        picked.update(dict.fromkeys(int(i) for i in np.linspace(0, n - 1, min(n, MEANING_SAMPLE))))
    if _DATE_QUESTION.search(question):  # the first dated sentences: the preamble's "dated as of"
        picked.update(dict.fromkeys(facts.dated[:qa_facts.DATED_FIRST]))
    return Plan(query, lexical, list(picked))


def rank(engine, index, facts: QaFacts, question: str,  # noqa: ANN001
         planned: Plan | None = None) -> list[tuple[int, float, float]]:
    """[(sentence index, fused score, cosine)] best first; full sentences before headings/fragments."""
    planned = planned or plan(index, facts, question)
    candidates = planned.candidates
    vectors = engine.embed([embedded_text(index, facts, i) for i in candidates] + [question])  # [C+1, D]
    cosine = vectors[:-1] @ vectors[-1]  # [C]
    fused = planned.lexical[candidates] + WEIGHTS["cosine"] * np.clip(cosine, 0.0, None)  # [C]
    scored = sorted((bool(facts.short[i]), -float(fused[j]), i, float(cosine[j])) for j, i in enumerate(candidates))
    return [(i, -neg, cos) for _, neg, i, cos in scored]


def embedded_text(index, facts: QaFacts, i: int) -> str:  # noqa: ANN001
    """What segment i is embedded as: with its section title, so that "The above warranties are valid
    for a period of ..." under "11. Warranty." means what it is about (a clause rarely repeats the
    words of its title, and a question's words are often the title's)."""
    title, text = facts.titles[i], index.texts[i]
    text = f"{title} {text}" if title and title not in text else text
    return text if i < LEAD else first_words(text, EMBED_WORDS)


def distinct(texts: dict[int, str] | list[str], ranked: list[tuple[int, float, float]]) -> list[tuple[int, float, float]]:
    """The ranking without repeats of a text already ranked (the CEO's and the CFO's identical
    certifications are one piece of evidence, not two)."""
    seen: set[str] = set()
    out = []
    for entry in ranked:
        if texts[entry[0]] not in seen:
            seen.add(texts[entry[0]])
            out.append(entry)
    return out


def _relative(scores: np.ndarray) -> np.ndarray:
    top = float(scores.max()) if len(scores) else 0.0
    return scores / top if top > 0 else np.zeros_like(scores)


def coverage(facts: QaFacts, query: str) -> np.ndarray:
    """[S] the share of the query's idf mass (rarity in the document's windows: a term in every
    window weighs ~0) that each window holds."""
    n = max(1, facts.windows.n)
    weights = {t: math.log(1 + n / (1 + facts.windows.df.get(t, 0))) for t in set(terms(query))}
    out = np.zeros(facts.windows.n, dtype=np.float32)
    total = sum(weights.values())
    if not total:
        return out
    for t, w in weights.items():
        if t in facts.postings:
            out[facts.postings[t]] += w
    return out / total


def cross_check(facts: QaFacts, question: str) -> np.ndarray:
    """[S] a penalty for a sentence naming another year / quarter / state than the question does; a
    bonus for a stated amount when the question asks for one, for a date when it asks when."""
    out = np.zeros(len(facts.short), dtype=np.float32)
    for kind, pattern in qa_facts.NAMED.items():
        asked = {m.group(0) for m in pattern.finditer(question.lower())}
        if asked:
            out -= ENTITY_PENALTY * np.array([bool(named) and not asked & named for named in facts.named[kind]])
    if _AMOUNT_QUESTION.search(question):
        out += AMOUNT_BONUS * facts.money
    if _DATE_QUESTION.search(question):
        out += DATE_BONUS * facts.date
    if _WHO_QUESTION.search(question):
        out += WHO_BONUS * facts.organization
    if _DATE_QUESTION.search(question) and not _END_QUESTION.search(question):
        # "entered into as of December 18, 1998" says when it was made, not when it ends (only the first
        # dated segments count: definitions further on date the agreements they name the same way)
        out += DATE_BONUS * facts.dated_as_of
    return out


def _not_stated(question: str, evidence: list[dict[str, Any]]) -> dict[str, Any]:
    return {"question": question, "answer": NOT_STATED, "evidence": evidence, "confidence": 0.0}


def _result(engine, answers: list[dict[str, Any]]) -> dict[str, Any]:  # noqa: ANN001
    return {"answers": answers, "method": "extractive", "engine": engine.kind, "model": engine.model_name}
