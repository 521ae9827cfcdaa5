"""Records as people read them: the text `longdoc run` prints, the Markdown report, the CSV rows.

Results are read by the fields every engine's result has (pipeline/tasks/schemas.py): summary +
citations, answers with evidence and confidence, label + scores. A task this module does not know
is shown as its JSON in the text and Markdown forms.
"""

from __future__ import annotations

import csv
import io
import json
import textwrap
from collections.abc import Iterable
from typing import Any

from longdoc.batch.records import Record


def _spans(items: Iterable[dict[str, Any]]) -> list[int]:
    pages: set[int] = set()
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("page_start"), int):
            pages.update(range(item["page_start"], int(item.get("page_end") or item["page_start"]) + 1))
    return sorted(pages)


def pages_text(pages: list[int]) -> str:
    """[1, 2, 3, 7] -> "pp. 1-3, 7"; [4] -> "p. 4"; [] -> ""."""
    if not pages:
        return ""
    runs: list[list[int]] = []
    for page in pages:
        if runs and page == runs[-1][1] + 1:
            runs[-1][1] = page
        else:
            runs.append([page, page])
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)
    return f"p. {text}" if len(pages) == 1 else f"pp. {text}"


def summary_of(result: dict[str, Any]) -> tuple[str, str]:
    """(summary, its pages)."""
    cited = result.get("citations") or result.get("sentences") or []
    return str(result.get("summary", "")), pages_text(_spans(cited))


def answers_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    """[{question, answer, pages, confidence}] from a qa result."""
    out = []
    for answer in result.get("answers") or []:
        own = [answer] if isinstance(answer.get("page_start"), int) else []
        evidence = answer.get("evidence") or []
        confidence = answer.get("confidence", answer.get("score"))
        out.append({"question": answer.get("question", ""), "answer": answer.get("answer", ""),
                    "pages": pages_text(_spans(own or evidence[:1])), "confidence": confidence})
    return out


def label_of(result: dict[str, Any]) -> tuple[str, float | None, list[tuple[str, float]]]:
    """(label, its probability, the other labels by probability)."""
    label = str(result.get("label", ""))
    scores = {k: float(v) for k, v in (result.get("scores") or {}).items()}
    others = sorted(((k, v) for k, v in scores.items() if k != label), key=lambda kv: -kv[1])
    return label, scores.get(label), others


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _wrap(text: str, indent: str, more: str | None = None) -> str:
    return textwrap.fill(text, width=100, initial_indent=indent, subsequent_indent=more or indent,
                         break_long_words=False, break_on_hyphens=False)


def readable(record: Record) -> str:
    """What `longdoc run` prints: the file's outcome, then each task's result."""
    head = record["path"]
    facts = [str(x) for x in (record.get("media_type"), record.get("pages") and f"{record['pages']} pages") if x]
    lines = [f"{head} ({', '.join(facts)})" if facts else head]
    results = record.get("results") or {}
    for task, result in results.items():
        lines.append("")
        if task == "summarize":
            summary, pages = summary_of(result)
            lines += ["Summary" + (f" ({pages})" if pages else ""), _wrap(summary, "  ")]
        elif task == "qa":
            lines.append("Answers")
            for a in answers_of(result):
                cite = f" ({a['pages']})" if a["pages"] else ""
                lines += [_wrap(f"Q: {a['question']}", "  ", "     "), _wrap(f"A: {a['answer']}{cite}", "  ", "     ")]
                if a["confidence"] is not None:
                    lines.append(f"     confidence {_fmt(a['confidence'])}")
        elif task == "classify":
            label, p, others = label_of(result)
            rest = ", ".join(f"{k} {_fmt(v)}" for k, v in others[:4])
            lines.append(f"Label: {label}" + (f" (p = {_fmt(p)})" if p is not None else "")
                         + (f"  [{rest}]" if rest else ""))
        else:
            lines += [task, "  " + json.dumps(result, ensure_ascii=False)]
    for task, error in (record.get("errors") or {}).items():
        lines += ["", f"{task} failed: {error['code']}: {error['message']}"]
    return "\n".join(lines)


def markdown_report(records: list[Record]) -> str:
    """One section per document: summary, answers with page citations, label."""
    ok = sum(r.get("status") == "ok" for r in records)
    parts = ["# longdoc batch report", "", f"{len(records)} files: {ok} ok, {len(records) - ok} not ok.", ""]
    for record in records:
        parts += [f"## {record['path']}", ""]
        error = record.get("error")
        if record.get("status") == "submitted":
            parts += ["*Submitted; not finished yet (run the batch again to resume).*", ""]
            continue
        if error and not record.get("results"):
            parts += [f"**Failed:** `{error['code']}`: {error['message']}", ""]
            continue
        if record.get("duplicate_of"):
            parts += [f"*Identical to {record['duplicate_of']}.*", ""]
        results = record.get("results") or {}
        if "summarize" in results:
            summary, pages = summary_of(results["summarize"])
            parts += ["**Summary**" + (f" ({pages})" if pages else ""), "", summary, ""]
        if "qa" in results:
            parts += ["**Answers**", ""]
            for a in answers_of(results["qa"]):
                cite = f" ({a['pages']})" if a["pages"] else ""
                parts.append(f"- *{a['question']}* {a['answer']}{cite}")
            parts.append("")
        if "classify" in results:
            label, p, _ = label_of(results["classify"])
            parts += [f"**Label:** {label}" + (f" (p = {_fmt(p)})" if p is not None else ""), ""]
        for task, result in results.items():
            if task not in ("summarize", "qa", "classify"):
                parts += [f"**{task}**", "", "```json", json.dumps(result, ensure_ascii=False, indent=2), "```", ""]
        for task, err in (record.get("errors") or {}).items():
            parts += [f"**{task} failed:** `{err['code']}`: {err['message']}", ""]
    return "\n".join(parts)


def csv_text(records: list[Record]) -> str:
    """One row per file: path, status, error, label, summary, and each answer with its pages."""
    questions = max((len(answers_of((r.get("results") or {}).get("qa") or {})) for r in records), default=0)
    header = ["path", "sha256", "status", "error_code", "error_message", "media_type", "pages",
              "label", "label_probability", "summary", "summary_pages", "duplicate_of"]
    for i in range(1, questions + 1):
        header += [f"question_{i}", f"answer_{i}", f"answer_{i}_pages", f"answer_{i}_confidence"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for r in records:
        results, error = r.get("results") or {}, r.get("error") or {}
        label, p, _ = label_of(results.get("classify") or {})
        summary, summary_pages = summary_of(results.get("summarize") or {})
        row = [r["path"], r.get("sha256") or "", r.get("status", ""), error.get("code", ""),
               error.get("message", ""), r.get("media_type") or "", r.get("pages") or "", label, _fmt(p),
               summary, summary_pages, r.get("duplicate_of") or ""]
        answers = answers_of(results.get("qa") or {})
        for i in range(questions):
            a = answers[i] if i < len(answers) else {}
            row += [a.get("question", ""), a.get("answer", ""), a.get("pages", ""), _fmt(a.get("confidence"))]
        writer.writerow(row)
    return buffer.getvalue()
