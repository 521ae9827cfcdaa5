"""The three tasks on real corpus PDFs (through the real parse + chunk path), checked against CUAD's
human annotations and against the pages they cite."""

from __future__ import annotations

import ast
import csv
from pathlib import Path

import pytest

from pipeline.tasks import run_task
from tests.fixtures_tasks import normalized, pages_text, parsed_document

CONTRACT = "contract-cybergy-affiliate.pdf"
LABELS = ["legal contract", "research paper", "financial report"]


def _plain(text: str) -> str:
    """Normalized for comparing PDF text with CUAD's: whitespace and typographic quotes."""
    for fancy, plain in (("“", '"'), ("”", '"'), ("’", "'"), ("‘", "'")):
        text = text.replace(fancy, plain)
    return normalized(text)


def cuad_clauses(corpus_dir: Path, pdf_name: str, category: str) -> list[str]:
    """CUAD's annotated clause texts of `category` for one corpus PDF (joined via MANIFEST.tsv)."""
    with open(corpus_dir / "MANIFEST.tsv", newline="") as f:
        source = {row["file"]: Path(row["source_path"]).name for row in csv.DictReader(f, delimiter="\t")}
    with open(corpus_dir / "annotations" / "cuad-master-clauses-shared.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["Filename"] == source[pdf_name])
    return [_plain(c) for c in ast.literal_eval(row[category])]


def _progress(fraction: float, stage: str) -> None:
    assert 0.0 <= fraction <= 1.0 and stage


@pytest.mark.parametrize("pdf_name, question, category", [
    (CONTRACT, "Which state's laws govern this agreement?", "Governing Law"),
    (CONTRACT, "Which state's law governs?", "Governing Law"),  # the section heading matches best
    (CONTRACT, "How much notice must a party give to terminate the agreement?",
     "Notice Period To Terminate Renewal"),
    ("contract-ivillage-sponsorship.pdf", "Which state's laws govern this agreement?", "Governing Law"),
    ("contract-ivillage-sponsorship.pdf", "Can a party assign this agreement to someone else?", "Anti-Assignment"),
])
def test_qa_answers_with_the_annotated_clause(extractive_engine, cybergy_doc, corpus_dir, pdf_name, question,
                                              category):
    doc = cybergy_doc if pdf_name == CONTRACT else parsed_document(corpus_dir / pdf_name)
    clauses = cuad_clauses(corpus_dir, pdf_name, category)
    assert clauses, f"CUAD has no {category} clause for {pdf_name}"
    result = run_task(extractive_engine, "qa", {"question": question}, doc, _progress)
    answer = result["answers"][0]
    cited = _plain(answer["answer"])
    page_start, page_end = answer["evidence"][0]["page_start"], answer["evidence"][0]["page_end"]
    # the answer sentence is (part of) the clause the annotators marked
    assert any(cited in clause or clause in cited for clause in clauses) and len(cited.split()) >= 8, cited
    page_text = _plain(pages_text(doc, page_start, page_end))
    assert cited in page_text
    assert any(clause in page_text for clause in clauses)  # the page it cites holds the whole clause


def test_summary_citations_are_real(extractive_engine, cybergy_doc):
    result = run_task(extractive_engine, "summarize", {"max_words": 120}, cybergy_doc, _progress)
    assert 40 <= len(result["summary"].split()) <= 120
    assert len({s["page_start"] for s in result["citations"]}) >= 2  # spread over the document
    for citation in result["citations"]:
        text = normalized(cybergy_doc.full_text[citation["char_start"]:citation["char_end"]])
        assert text in result["summary"]
        assert text in pages_text(cybergy_doc, citation["page_start"], citation["page_end"])
    assert "Marketing Affiliate" in result["summary"] or "MA" in result["summary"].split()


@pytest.mark.parametrize("pdf_name, expected", [
    (CONTRACT, "legal contract"),
    ("paper-specter-acl2020.pdf", "research paper"),
    ("report-aapl-10q-2022q3.pdf", "financial report"),
])
def test_classify_real_documents(extractive_engine, corpus_dir, cybergy_doc, pdf_name, expected):
    doc = cybergy_doc if pdf_name == CONTRACT else parsed_document(corpus_dir / pdf_name, first_pages=4)
    result = run_task(extractive_engine, "classify", {"labels": LABELS}, doc, _progress)
    assert result["label"] == expected, result["scores"]
    assert result["scores"][expected] > 0.5
