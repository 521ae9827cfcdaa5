"""Summarize on MPT: greedy generation from the document prefix, or map-reduce over its chunks.

- whole_document: head + document + summary instruction fits the context with max_tokens of output.
- map_reduce: the chunks are grouped into windows that fit; the windows' summaries are submitted
  together (the engine batches them), then combined, in rounds until they fit one final prompt.
Each summary sentence cites the document sentence that best supports it (retrieval over the whole
document), which gives its pages.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from pipeline.engine.core.requests import GenerateRequest, GenerateResult, SamplingParams
from pipeline.tasks.extractive.segments import count_words, first_words
from pipeline.tasks.mpt.common import Session, doc_chunks, greedy, pages_of, session, submit_all
from pipeline.tasks.mpt.prompts import TaskText
from pipeline.tasks.mpt.retrieve import SentenceIndex, sentences
from pipeline.tasks.progress import scaled
from pipeline.types import DocumentText, PipelineError

TOKENS_PER_WORD = 1.4  # output budget for a word budget (English runs ~1.3 tokens per word)
MAP_TOKENS = (48, 256)  # a window summary's token budget: max_tokens clamped to this range
MAX_ROUNDS = 6  # combine rounds; each at least halves the partial summaries (_fit_map_tokens)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def summary_task(words: int, style: str, focus: str | None, *, scope: str = "document") -> TaskText:
    """scope: "document" (the whole document is above), "part" (one window of it), "combine" (the
    summaries of its consecutive parts are above)."""
    shape = ("as a bulleted list, one point per line starting with \"- \"" if style == "bullets"
             else "as one paragraph")
    about = f" Focus on {focus}." if focus else ""
    focusing = f", focusing on {focus}" if focus else ""
    form = "bullet points" if style == "bullets" else "one paragraph"
    if scope == "part":
        return TaskText(f"Summarize this part of a longer document in at most {words} words.{about}",
                        f"Summary of this part of the document{focusing} (at most {words} words):\n")
    if scope == "combine":
        return TaskText(
            "The text above is a series of summaries of consecutive parts of one document. Combine them "
            f"into one summary of the whole document in at most {words} words, {shape}.{about}",
            f"Summary of the whole document{focusing}, combining the part summaries above ({form}, "
            f"at most {words} words):\n" + ("- " if style == "bullets" else ""))
    return TaskText(f"Summarize the document above in at most {words} words, {shape}.{about}",
                    f"Summary of the document above{focusing} ({form}, at most {words} words):\n"
                    + ("- " if style == "bullets" else ""))


@dataclass(frozen=True)
class Window:
    ids: list[int]
    char_start: int
    char_end: int


def windows(s: Session, doc: DocumentText, budget: int) -> list[Window]:
    """Consecutive chunk text cut into windows of at most `budget` tokens (chunk overlaps dropped)."""
    text, pieces, prev = doc.full_text, [], 0
    for c in sorted(doc_chunks(doc), key=lambda c: c.char_start):
        a, b = max(c.char_start, prev), c.char_end
        if b > a and text[a:b].strip():
            pieces.append((a, b, len(s.builder.context(text[a:b]))))
        prev = max(prev, b)
    out: list[Window] = []
    i = 0
    while i < len(pieces):
        j, total = i, 0
        while j < len(pieces) and total + pieces[j][2] <= budget:
            total += pieces[j][2]
            j += 1
        if j == i:  # one piece longer than a window: its ids in window-sized parts
            a, b, _ = pieces[i]
            ids = s.builder.context(text[a:b])
            out += [Window(ids[k:k + budget], a, b) for k in range(0, len(ids), budget)]
            i += 1
            continue
        while True:  # pieces re-tokenized together can come out a little longer than their parts
            a, b = pieces[i][0], pieces[j - 1][1]
            ids = s.builder.context(text[a:b])
            if len(ids) <= budget or j == i + 1:
                break
            j -= 1
        out.append(Window(ids[:budget], a, b))
        i = j
    return out


def _params(s: Session, max_tokens: int) -> SamplingParams:
    # a paragraph ends at a blank line; bullets are one per line, so a blank line ends them too
    return greedy(s, max_tokens, "\n\n")


def _text(s: Session, result: GenerateResult, task: TaskText) -> str:
    lead = "- " if s.builder.family.name == "completion" and task.cue.endswith("- ") else ""
    return s.builder.clean(lead + result.text)


def _fit_map_tokens(s: Session, max_tokens: int, task: TaskText) -> int:
    """A window summary's budget: max_tokens within MAP_TOKENS, and at most a quarter of what a
    prompt can hold, so every combine round takes >= 2 summaries per prompt and the rounds end."""
    room = s.max_len - s.builder.overhead(task)
    cap = min(MAP_TOKENS[1], room // 4)
    if cap < 8:
        raise PipelineError("context_too_long", f"a context of {s.max_len} tokens leaves no room to summarize")
    return max(min(max_tokens, cap), min(MAP_TOKENS[0], cap))


def map_reduce(s: Session, doc: DocumentText, words: int, max_tokens: int, style: str, focus: str | None,
               progress) -> tuple[GenerateResult, int, int]:
    """(final result, document tokens read, rounds)."""
    part = summary_task(0, style, focus, scope="part")
    map_tokens = _fit_map_tokens(s, max_tokens, part)
    map_words = max(10, int(map_tokens / TOKENS_PER_WORD))
    part = summary_task(map_words, style, focus, scope="part")
    wins = windows(s, doc, s.budget(part, map_tokens))
    results = submit_all(s, [GenerateRequest(s.builder.prompt(w.ids, part).ids, _params(s, map_tokens))
                             for w in wins], scaled(progress, 0.05, 0.7, "summarizing parts"))
    items = [t for r in results if (t := _text(s, r, part))]
    tokens_in = sum(len(w.ids) for w in wins)
    final = summary_task(words, style, focus, scope="combine")
    middle = summary_task(map_words, style, focus, scope="combine")
    for rounds in range(1, MAX_ROUNDS + 1):
        joined = s.builder.context("\n\n".join(items))
        if s.fits(len(joined), final, max_tokens):
            report = scaled(progress, 0.7, 0.9, "combining")
            (result,) = submit_all(s, [GenerateRequest(s.builder.prompt(joined, final).ids,
                                                       _params(s, max_tokens))], report)
            return result, tokens_in, rounds
        groups = _groups(s, items, s.budget(middle, map_tokens))
        if len(groups) >= len(items):
            break
        results = submit_all(s, [GenerateRequest(s.builder.prompt(g, middle).ids, _params(s, map_tokens))
                                 for g in groups])
        items = [t for r in results if (t := _text(s, r, middle))]
    raise PipelineError("context_too_long", f"the partial summaries did not fit {s.max_len} tokens "
                                            f"after {MAX_ROUNDS} rounds")


def _groups(s: Session, items: list[str], budget: int) -> list[list[int]]:
    """Consecutive partial summaries joined into prompts of at most `budget` tokens each."""
    groups: list[list[int]] = []
    sep = s.builder.context("\n\n")
    for item in items:
        ids = s.builder.context(item)[:budget]
        if groups and len(groups[-1]) + len(sep) + len(ids) <= budget:
            groups[-1] += sep + ids
        else:
            groups.append(ids)
    return groups


def trim(summary: str, max_words: int | None, style: str) -> str:
    """At most max_words words: whole bullets / sentences while they fit, else a word prefix."""
    if max_words is None or count_words(summary) <= max_words:
        return summary
    units = summary.splitlines() if style == "bullets" else _SENTENCE_END.split(summary)
    kept: list[str] = []
    for unit in units:
        if count_words(" ".join([*kept, unit])) > max_words:
            break
        kept.append(unit)
    if count_words(" ".join(kept)) >= 0.6 * max_words:
        return ("\n" if style == "bullets" else " ").join(kept)
    return first_words(summary, max_words)


def citations(s: Session, doc: DocumentText, summary: str) -> list[dict[str, Any]]:
    """For each summary sentence (or bullet), the document sentence that supports it best."""
    index = SentenceIndex.of(s, doc)
    out = []
    for i, (a, b) in enumerate(sentences(summary)):
        hits = index.top(summary[a:b], 1)
        if hits:
            out.append({**pages_of(doc, hits[0].char_start, hits[0].char_end), "sentence": i})
    return out


def run(engine: Any, doc: DocumentText, params: dict[str, Any], progress) -> dict[str, Any]:
    s = session(engine)
    style, focus = params.get("style", "paragraph"), params.get("focus")
    max_words = params.get("max_words")
    max_tokens = params.get("max_tokens") or math.ceil(max_words * TOKENS_PER_WORD)
    words = max_words or max(10, int(max_tokens / TOKENS_PER_WORD))
    task = summary_task(words, style, focus)
    doc_ids = s.builder.document(doc.full_text)
    progress(0.05, "prompting")
    if s.fits(len(doc_ids), task, max_tokens):
        method = "whole_document"
        (result,) = submit_all(s, [GenerateRequest(s.builder.prompt(doc_ids, task).ids,
                                                   _params(s, max_tokens))],
                               scaled(progress, 0.05, 0.9, "generating"))
        tokens_in, summary_task_text = len(doc_ids), task
    else:
        method = "map_reduce"
        result, tokens_in, _ = map_reduce(s, doc, words, max_tokens, style, focus, progress)
        summary_task_text = summary_task(words, style, focus, scope="combine")
    summary = trim(_text(s, result, summary_task_text), max_words, style)
    progress(0.92, "citing")
    return {"summary": summary, "method": method, "engine": "mpt", "model": s.model_name,
            "tokens_in": tokens_in, "tokens_out": len(result.tokens), "citations": citations(s, doc, summary)}
