"""Quality floors of the extractive backend on a small corpus sample (bench/extractive_quality.py runs
the whole corpus): document-type classification with the default labels, CUAD clauses and 10-Q
figures held by the cited evidence, and the two failing cases of issue 10."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pipeline.tasks import run_task
from tests.fixtures_tasks import parsed_document

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import extractive_quality as quality  # noqa: E402 - the bench's annotations and questions

SAMPLE_CONTRACTS = ["contract-cybergy-affiliate.pdf", "contract-ivillage-sponsorship.pdf"]
CUAD_EVIDENCE_FLOOR = 0.8


def _none(fraction: float, stage: str) -> None:
    pass


@pytest.fixture(scope="module")
def docs(corpus_dir: Path, cybergy_doc):
    names = ["contract-ivillage-sponsorship.pdf", "report-nvda-10q-2023q1.pdf", "paper-specter-acl2020.pdf"]
    return {"contract-cybergy-affiliate.pdf": cybergy_doc, **{n: parsed_document(corpus_dir / n) for n in names}}


def test_default_labels_classify_by_document_type(extractive_engine, docs):
    for pdf, kind in [("contract-cybergy-affiliate.pdf", "contract"), ("report-nvda-10q-2023q1.pdf", "report"),
                      ("paper-specter-acl2020.pdf", "paper")]:
        result = run_task(extractive_engine, "classify", {}, docs[pdf], _none)  # no labels: document types
        assert set(result["scores"]) == set(quality.DEFAULT_LABELS)
        assert result["label"] == kind, (pdf, result["scores"])


def test_cited_evidence_holds_the_annotated_cuad_clause(extractive_engine, docs):
    clauses = quality.cuad_clauses()
    hits = []
    for pdf in SAMPLE_CONTRACTS:
        asked = [c for c in quality.CUAD_QUESTIONS if clauses[pdf][c]]
        result = run_task(extractive_engine, "qa", {"questions": [quality.CUAD_QUESTIONS[c] for c in asked]},
                          docs[pdf], _none)
        for category, answer in zip(asked, result["answers"], strict=True):
            hits.append(any(quality.in_clause(e["text"], clauses[pdf][category]) for e in answer["evidence"]))
    assert len(hits) >= 10 and sum(hits) / len(hits) >= CUAD_EVIDENCE_FLOOR, hits


def test_10q_figures_and_the_issue_cases(extractive_engine, docs):
    nvda = docs["report-nvda-10q-2023q1.pdf"]
    rows = [(q, keys) for pdf, q, keys in quality.tenq_rows() if pdf == "report-nvda-10q-2023q1.pdf"]
    result = run_task(extractive_engine, "qa", {"questions": [q for q, _ in rows]}, nvda, _none)
    held = [any(k.lower() in " ".join(e["text"] for e in a["evidence"]).lower() for k in keys)
            for (_, keys), a in zip(rows, result["answers"], strict=True)]
    assert sum(held) >= 3, held
    # "total revenue for the quarter" is the total, not one segment's or one customer's revenue
    total = run_task(extractive_engine, "qa", {"question": "What was total revenue for the quarter?"}, nvda, _none)
    assert "7,192" in total["answers"][0]["answer"] or "7.19 billion" in total["answers"][0]["answer"]
    law = run_task(extractive_engine, "qa", {"question": "Which state's law governs this agreement?"},
                   docs["contract-ivillage-sponsorship.pdf"], _none)
    assert "State of New York" in law["answers"][0]["answer"]



def test_an_addendum_naming_another_state_does_not_win(extractive_engine):
    """Issue 10's governing-law case: a state addendum that names another state scored above the
    agreement's own choice-of-law clause."""
    from tests.fixtures_tasks import document_from_pages

    doc = document_from_pages([
        "MASTER SERVICES AGREEMENT. This Agreement is made between Northwind Inc. and Contoso LLC for "
        "consulting services. Governing Law. This Agreement shall be governed by and construed in "
        "accordance with the laws of the State of New York, without regard to its conflict of laws rules.",
        "CALIFORNIA ADDENDUM. For services performed in California, the parties acknowledge that the "
        "California Labor Code applies to the wages of the consultants, and this addendum is governed "
        "by California state law for those services only.",
    ])
    result = run_task(extractive_engine, "qa", {"question": "Which state's law governs this agreement?"}, doc, _none)
    assert "State of New York" in result["answers"][0]["answer"], result["answers"][0]
