"""Each cleaning step on real corpus pages (raw PDFium / pypdf output), plus the invariants the
whole cleaned corpus must hold."""

from __future__ import annotations

import unicodedata

import pypdf
import pypdfium2 as pdfium
import pytest

from pipeline.clean import (
    clean_pages,
    dehyphenate,
    document_vocabulary,
    normalize_unicode,
    normalize_whitespace,
    remove_repeated_margins,
)


def pdfium_pages(path) -> list[str]:
    doc = pdfium.PdfDocument(str(path))
    try:
        return [doc[i].get_textpage().get_text_range() for i in range(len(doc))]
    finally:
        doc.close()


@pytest.fixture(scope="module")
def dhs_raw(corpus_dir):
    return pdfium_pages(corpus_dir / "report-dhs-strategic-plan-2020.pdf")


def _dehyphenated(pages: list[str]) -> list[str]:
    pages = [normalize_unicode(p) for p in pages]
    vocabulary = document_vocabulary(pages)
    return [dehyphenate(p, vocabulary) for p in pages]


def test_dehyphenation_of_pdfium_soft_hyphens(dhs_raw, corpus_dir):
    assert "infrastruc\ufffeture" in dhs_raw[4]  # PDFium's marker for a line-end hyphen
    page = _dehyphenated(dhs_raw)[4]
    for word in ("public", "terrorists", "infrastructure", "including", "criminal", "Administration",
                 "safeguarding", "government", "payment"):
        assert word in page, word
    assert "\ufffe" not in page
    # Real compounds keep their hyphen: a capital after it, or both halves words of the document.
    opm = _dehyphenated(pdfium_pages(corpus_dir / "report-opm-annual-performance-fy2013.pdf"))
    assert "implementation-focused" in opm[8]
    assert "Government-wide" in opm[11]
    assert "Multi-State" in opm[13]
    assert "Self-Governance" in opm[14]


def test_dehyphenation_of_pypdf_line_end_hyphens(corpus_dir):
    raw = pypdf.PdfReader(corpus_dir / "paper-mapreduce-osdi04.pdf").pages[0].extract_text()
    assert "associ-\nated" in raw and "par-\nallelize" in raw
    page = _dehyphenated([raw])[0]
    for word in ("associated", "automatically", "commodity", "program", "machine", "terabytes",
                 "thousand", "conceptually", "parallelize", "computation"):
        assert word in page, word


def test_dehyphenation_leaves_numbers_and_dashes_alone():
    vocabulary = document_vocabulary(["Case No. 18-10248-\nMFW and the well-known rule; a well-\nknown fact"])
    text = dehyphenate("Case No. 18-10248-\nMFW; a well-\nknown fact; 1990-\n1995; bullet -\nnext", vocabulary)
    assert "18-10248-MFW" in text
    assert "well-known" in text
    assert "1990-1995" in text
    assert "bullet -\nnext" in text


def test_repeated_footers_are_removed_but_said_once(corpus_dir):
    raw = [normalize_unicode(p) for p in pdfium_pages(corpus_dir / "contract-zogenix-distributor.pdf")]
    footer = "Source: ZOGENIX, INC., 10-Q, 5/9/2019"
    assert sum(footer in p for p in raw) == 68
    cleaned, removed = remove_repeated_margins(raw)
    assert sum(footer in p for p in cleaned) == 1
    assert sum("US-DOCS\\105216871.19" in p for p in cleaned) == 1
    assert removed >= 2 * 67
    # Nothing but margin lines went: every other line is still there, in order.
    for before, after in zip(raw, cleaned, strict=True):
        kept = iter(before.split("\n"))
        assert all(any(line == b for b in kept) for line in after.split("\n"))


def test_page_numbers_follow_the_page_sequence(dhs_raw, corpus_dir):
    raw = [normalize_unicode(p) for p in dhs_raw]
    assert sum(line.startswith("Page ") and line[5:].isdigit() for p in raw for line in p.split("\n")) >= 20
    cleaned, _ = remove_repeated_margins(raw)
    assert not any(line.startswith("Page ") and line[5:].isdigit() for p in cleaned for line in p.split("\n")
                   if len(p.split("\n")) >= 4)  # a page of 1-3 lines is all body, by design
    # Numbered list items in the margins are not page numbers and stay.
    cybergy = [normalize_unicode(p) for p in pdfium_pages(corpus_dir / "contract-cybergy-affiliate.pdf")]
    kept, _ = remove_repeated_margins(cybergy)
    for item in ("1.", "2.", "3.", "4."):
        before = sum(line.strip() == item for p in cybergy for line in p.split("\n"))
        after = sum(line.strip() == item for p in kept for line in p.split("\n"))
        assert before == after, item


def test_short_pages_are_all_body(corpus_dir):
    raw = [normalize_unicode(p) for p in pdfium_pages(corpus_dir / "hostile-xref-loop.pdf")]
    cleaned, removed = remove_repeated_margins(raw)
    assert removed == 0 and cleaned == raw


def test_unicode_and_whitespace_normalization(corpus_dir):
    raw = pdfium_pages(corpus_dir / "report-ibm-redpaper-sampled.pdf")
    assert any(ch < " " and ch not in "\r\n\t" for p in raw for ch in p)  # stray control characters
    assert any("\r\n" in p for p in raw)
    cleaned = [normalize_whitespace(normalize_unicode(p)) for p in raw]
    assert not any(ch < " " and ch != "\n" for p in cleaned for ch in p)
    assert not any("  " in p or "\n\n\n" in p or " \n" in p for p in cleaned)
    decomposed = "Re\u0301sume\u0301\u00a0\u2003caf\u00e9\u200b\t\tend \r\n\r\n\r\n\r\nnext"
    assert normalize_whitespace(normalize_unicode(decomposed)) == "R\u00e9sum\u00e9 caf\u00e9 end\n\nnext"


def test_cleaned_corpus_invariants(parsed_corpus):
    for name, doc in parsed_corpus.items():
        for page in doc.pages:
            text = page.text
            assert unicodedata.is_normalized("NFC", text), name
            assert "\r" not in text and "\ufffe" not in text and "  " not in text, (name, page.number)
            assert text == text.strip(), (name, page.number)


def test_clean_pages_reports_what_it_removed(corpus_dir):
    pages, warnings = clean_pages(pdfium_pages(corpus_dir / "contract-cerence-ip.pdf"))
    assert len(pages) == 24
    assert warnings and "repeated header/footer" in warnings[0]
