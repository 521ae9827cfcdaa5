"""QA on MPT: every question of a job is one short greedy generation, all submitted together.

- whole_document: each prompt is head + document + question, so the questions share the document's
  KV blocks (prefilled once).
- retrieval: the document does not fit; each question gets the chunks that best match it, packed up
  to the context budget in document order.
The answer is the generated line; "not stated in the document" when the model says the document does
not say, or when no passage the model read supports the answer's words. Confidence is the answer
tokens' geometric-mean probability, exp(mean log p). Evidence: the document sentences that best
match question + answer, inside what the model read.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pipeline.engine.core.requests import GenerateRequest, GenerateResult
from pipeline.tasks.mpt.common import Session, doc_chunks, greedy, pack, pages_of, session, submit_all
from pipeline.tasks.mpt.prompts import TaskText
from pipeline.tasks.mpt.retrieve import ChunkIndex, Evidence, SentenceIndex
from pipeline.tasks.progress import scaled
from pipeline.tasks.schemas import NOT_STATED
from pipeline.types import DocumentText

ANSWER_TOKENS = 64  # answers are one short line; the newline stop usually ends them far sooner
EVIDENCE = 3  # passages cited per answer, best first
# the whole answer is one of these words, or it opens with one of these phrases
_NOT_STATED_WORD = re.compile(r"^\W*(?:n/?a|none|unknown|no answer|not stated)\W*$", re.I)
_NOT_STATED = re.compile(
    r"^\W*(?:(?:it is |this is |that is )?not (?:stated|mentioned|specified|given|provided|found)\b"
    r"|(?:the )?(?:document|text) (?:does not|doesn't|do not) (?:say|state|mention|specify)"
    r"|there is no (?:information|mention)|no (?:information|mention) (?:is given|of)|cannot be determined)",
    re.I)
_WORD = re.compile(r"[a-z0-9]+")
_FUNCTION_WORD_LIST = ("a an and are as at be by for from has have in is it its of on or that the this to "
                       "was were with yes no not")
_FUNCTION_WORDS = frozenset(_FUNCTION_WORD_LIST.split())


def qa_task(question: str) -> TaskText:
    return TaskText(
        "Answer the question from the document above in one short sentence. If the document does not "
        f"say, answer: {NOT_STATED}.\nQuestion: {question}",
        f"Question about the document above: {question}\n"
        f"Answer (one short sentence, or \"{NOT_STATED}\" if the document does not say):")


def says_not_stated(answer: str) -> bool:
    return not answer.strip() or bool(_NOT_STATED_WORD.match(answer) or _NOT_STATED.match(answer))


def content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _FUNCTION_WORDS}


def supported(answer: str, evidence: list[Evidence]) -> bool:
    """Some content word of the answer occurs in its evidence (an answer of function words only,
    "Yes." / "No.", needs none)."""
    words = content_words(answer)
    if not words:
        return True
    return bool(words & set().union(*(content_words(p.text) for p in evidence)))


def confidence(result: GenerateResult) -> float:
    if not result.logprobs:
        return 0.0
    return math.exp(sum(result.logprobs) / len(result.logprobs))


def _contexts(s: Session, doc: DocumentText, questions: list[str], tasks: list[TaskText]
              ) -> tuple[str, list[tuple[list[int], list[tuple[int, int]]]]]:
    """(method, per question: its context ids and the document spans they hold)."""
    doc_ids = s.builder.document(doc.full_text)
    if all(s.fits(len(doc_ids), t, ANSWER_TOKENS) for t in tasks):
        return "whole_document", [(doc_ids, [(0, len(doc.full_text))])] * len(tasks)
    index = ChunkIndex(s, doc_chunks(doc))
    out = []
    for question, task in zip(questions, tasks, strict=True):
        packed = pack(s, doc, index.rank(question), s.budget(task, ANSWER_TOKENS))
        out.append((packed.ids, packed.spans))
    return "retrieval", out


def run(engine: Any, doc: DocumentText, params: dict[str, Any], progress) -> dict[str, Any]:
    s = session(engine)
    questions = params["questions"]
    tasks = [qa_task(q) for q in questions]
    progress(0.05, "retrieving")
    method, contexts = _contexts(s, doc, questions, tasks)
    sampling = greedy(s, ANSWER_TOKENS, "\n")
    requests = [GenerateRequest(s.builder.prompt(ids, t).ids, sampling) for (ids, _), t in zip(contexts, tasks,
                                                                                                strict=True)]
    results = submit_all(s, requests, scaled(progress, 0.1, 0.9, "answering"))
    progress(0.92, "citing")
    index = SentenceIndex.of(s, doc)
    answers = []
    for question, (_, spans), result in zip(questions, contexts, results, strict=True):
        answer, p = s.builder.clean(result.text), confidence(result)
        evidence: list[Evidence] = []
        if says_not_stated(answer):
            answer = NOT_STATED
        else:
            evidence = index.top(f"{question} {answer}", EVIDENCE, within=spans)
            if not supported(answer, evidence):
                # nothing the model read holds the answer's words: report that plainly; the confidence
                # is then how unlikely the model found its own unsupported answer
                answer, p, evidence = NOT_STATED, 1.0 - p, []
        answers.append({"question": question, "answer": answer, "confidence": round(min(max(p, 0.0), 1.0), 4),
                        "evidence": [{"text": e.text, **pages_of(doc, e.char_start, e.char_end),
                                      "score": round(e.score, 4)} for e in evidence]})
    return {"answers": answers, "method": method, "engine": "mpt", "model": s.model_name}
