"""The whole shared corpus through parse_file (contained child processes), both PDF extractors.

CUAD fidelity measure: word-level F1 on normalized tokens (lower-cased \\w+ runs, compared as
multisets) between our text and CUAD's reference .txt. Measured here (2026-11-28), the same with
PDFium and pypdf: F1 of the text before header/footer removal >= 0.9978 on all 8 contracts; after
full cleaning precision >= 0.9985 and recall >= 0.967 (the reference repeats every page's footer
and page number; cleaning keeps one copy of a repeated line). Thresholds held: F1 0.995 (PDFium),
precision 0.998 and recall 0.95 (both extractors).
"""

from __future__ import annotations

import re
from collections import Counter

import pytest

from pipeline.clean import clean_pages
from pipeline.parse.pdf import extract_pdf
from pipeline.types import ParsedDocument, PipelineError
from tests.corpus_expectations import EXPECTED, corpus_files, parsed_pdfs

CONTRACTS = sorted(n for n in EXPECTED if n.startswith("contract-") and n.endswith(".pdf"))


def word_scores(candidate: str, reference: str) -> tuple[float, float, float]:
    """(precision, recall, F1) of candidate's words against reference's, as multisets."""
    ours = Counter(re.findall(r"\w+", candidate.lower()))
    theirs = Counter(re.findall(r"\w+", reference.lower()))
    overlap = sum((ours & theirs).values())
    precision, recall = overlap / sum(ours.values()), overlap / sum(theirs.values())
    return precision, recall, 2 * precision * recall / (precision + recall)


def _check(name: str, result: ParsedDocument | PipelineError, expected_code: str | None = None) -> None:
    expected = EXPECTED[name]
    if expected.status == "failed" or expected_code:
        assert isinstance(result, PipelineError), f"{name}: expected failure, got {result!r:.200}"
        assert result.code == (expected_code or expected.code), f"{name}: {result.code}: {result.message}"
        assert result.message
        return
    assert isinstance(result, ParsedDocument), f"{name}: {result}"
    assert result.media_type == expected.media_type, name
    if expected.pages is not None:
        assert len(result.pages) == expected.pages, name
    assert [p.number for p in result.pages] == list(range(1, len(result.pages) + 1))
    chars = sum(len(p.text) for p in result.pages)
    assert chars >= expected.min_chars, f"{name}: {chars} chars < {expected.min_chars}"


def test_expectations_cover_every_corpus_file(corpus_dir):
    assert set(corpus_files(corpus_dir)) == set(EXPECTED)


def test_every_corpus_file_parses_or_fails_as_expected(corpus_results):
    for name, result in corpus_results.items():
        _check(name, result)


@pytest.mark.slow
def test_pypdf_extractor_over_every_parseable_pdf(corpus_results_pypdf, corpus_results):
    for name, result in corpus_results_pypdf.items():
        _check(name, result, EXPECTED[name].pypdf_code)
        if isinstance(result, ParsedDocument):
            # The two extractors agree on the words of each document.
            ours = "\n".join(p.text for p in corpus_results[name].pages)
            _, _, f1 = word_scores("\n".join(p.text for p in result.pages), ours)
            assert f1 >= 0.9 or len(ours) < 200, f"{name}: pypdf vs PDFium word F1 {f1:.3f}"


def test_text_and_labels_are_plain_json_types(parsed_corpus):
    doc = parsed_corpus["report-aapl-10q-2022q3.pdf"]  # encrypted with an empty user password
    assert all(isinstance(p.text, str) and p.label is None for p in doc.pages)
    assert "Apple" in doc.pages[0].text


@pytest.mark.parametrize("name", CONTRACTS)
def test_cuad_contract_matches_reference_text(name, parsed_corpus, corpus_dir):
    reference = (corpus_dir / name.replace(".pdf", ".txt")).read_text(encoding="utf-8")
    raw = extract_pdf(corpus_dir / name, password=None, extractor="pdfium", max_pages=2000)
    unmargined, _ = clean_pages([p.text for p in raw.pages], remove_margins=False)
    assert word_scores("\n".join(unmargined), reference)[2] >= 0.995
    precision, recall, _ = word_scores("\n".join(p.text for p in parsed_corpus[name].pages), reference)
    assert precision >= 0.998, f"cleaning added or garbled words: precision {precision:.4f}"
    assert recall >= 0.95, f"cleaning dropped words: recall {recall:.4f}"


@pytest.mark.slow
def test_cuad_contracts_through_pypdf_match_reference(corpus_results_pypdf, corpus_dir):
    for name in CONTRACTS:
        reference = (corpus_dir / name.replace(".pdf", ".txt")).read_text(encoding="utf-8")
        precision, recall, _ = word_scores("\n".join(p.text for p in corpus_results_pypdf[name].pages), reference)
        assert precision >= 0.998 and recall >= 0.95, (name, precision, recall)


def test_parsed_pdfs_list_is_what_the_pypdf_fixture_covers():
    assert "hostile-irs-irm-400pages.pdf" in parsed_pdfs()
    assert "hostile-scanned-no-text.pdf" not in parsed_pdfs()
