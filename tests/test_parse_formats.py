"""Encryption, page labels, OCR-needing pages, and the non-PDF formats, through parse_file."""

from __future__ import annotations

import io
import shutil
import zipfile

import pypdf
import pytest

from pipeline.parse import ParseLimits, parse_file
from pipeline.parse.sniff import DOCX, HTML, MARKDOWN, PDF, TEXT
from pipeline.parse.textlike import VIRTUAL_PAGE_CHARS, paginate
from pipeline.types import PipelineError
from tests.fixtures_parse import text_pdf

LIMITS = ParseLimits(max_pages=500, timeout_s=120, memory_mb=1024)
ENCRYPTED = "hostile-encrypted-aes256-userpw.pdf"


@pytest.mark.parametrize("extractor", ["pdfium", "pypdf"])
def test_user_password_pdf_needs_the_right_password(extractor, corpus_dir):
    path = corpus_dir / ENCRYPTED
    with pytest.raises(PipelineError) as missing:
        parse_file(path, extractor=extractor, limits=LIMITS)
    assert missing.value.code == "password_required"
    with pytest.raises(PipelineError) as wrong:
        parse_file(path, password="not-it", extractor=extractor, limits=LIMITS)
    assert wrong.value.code == "wrong_password"
    doc = parse_file(path, password="password", extractor=extractor, limits=LIMITS)
    assert "crazy ones" in doc.pages[0].text.lower()


def test_pdf_encrypted_here_with_aes_and_a_user_password(corpus_dir, tmp_path):
    writer = pypdf.PdfWriter(clone_from=corpus_dir / "contract-galera-joint-filing.pdf")
    writer.encrypt("s3cret", "owner", algorithm="AES-256")
    path = tmp_path / "locked.pdf"
    writer.write(path)
    with pytest.raises(PipelineError, match="password_required"):
        parse_file(path, limits=LIMITS)
    assert len(parse_file(path, password="s3cret", limits=LIMITS).pages) == 3


def test_empty_user_password_opens_transparently(corpus_dir, tmp_path):
    writer = pypdf.PdfWriter(clone_from=corpus_dir / "contract-galera-joint-filing.pdf")
    writer.encrypt("", "owner-only", algorithm="AES-128")
    path = tmp_path / "owner-only.pdf"
    writer.write(path)
    assert pypdf.PdfReader(path).is_encrypted
    doc = parse_file(path, limits=LIMITS)
    assert "JOINT FILING AGREEMENT" in doc.pages[0].text.upper()


def test_page_labels_come_from_the_pdf(corpus_dir, tmp_path):
    writer = pypdf.PdfWriter(clone_from=corpus_dir / "contract-galera-joint-filing.pdf")
    writer.set_page_label(0, 0, style="/r")
    writer.set_page_label(1, 2, style="/D", prefix="A-", start=1)
    path = tmp_path / "labelled.pdf"
    writer.write(path)
    for extractor in ("pdfium", "pypdf"):
        doc = parse_file(path, extractor=extractor, limits=LIMITS)
        assert [(p.number, p.label) for p in doc.pages] == [(1, "i"), (2, "A-1"), (3, "A-2")]


def test_scanned_page_is_flagged_and_counted_not_dropped(corpus_dir, tmp_path):
    writer = pypdf.PdfWriter(clone_from=corpus_dir / "contract-galera-joint-filing.pdf")
    writer.append(corpus_dir / "hostile-scanned-no-text.pdf")
    path = tmp_path / "mixed.pdf"
    writer.write(path)
    for extractor in ("pdfium", "pypdf"):
        doc = parse_file(path, extractor=extractor, limits=LIMITS)
        assert len(doc.pages) == 4
        assert [p.needs_ocr for p in doc.pages] == [False, False, False, True]
        assert doc.needs_ocr_pages == 1
        assert doc.pages[3].text == ""
        assert any("need OCR" in w for w in doc.warnings)


def test_blank_pages_are_kept_without_ocr_flag(corpus_dir):
    doc = parse_file(corpus_dir / "paper-layoutparser-empty-pages.pdf", limits=LIMITS)
    blank = [p for p in doc.pages if not p.text]
    assert len(doc.pages) == 4 and len(blank) == 2
    assert not any(p.needs_ocr for p in blank)


def test_renamed_pdf_is_parsed_as_pdf(corpus_dir, tmp_path):
    path = tmp_path / "really-a-pdf.txt"
    shutil.copy(corpus_dir / "contract-galera-joint-filing.pdf", path)
    doc = parse_file(path, limits=LIMITS)
    assert doc.media_type == PDF and len(doc.pages) == 3


@pytest.mark.parametrize("content", [b"\x00\x01\x02\x03" * 100, b"\x89PNG\r\n\x1a\n" + b"\x00" * 64])
def test_binary_garbage_is_unsupported(content, tmp_path):
    path = tmp_path / "x.pdf"
    path.write_bytes(content)
    with pytest.raises(PipelineError, match="unsupported_media_type"):
        parse_file(path, limits=LIMITS)


def test_truncated_pdf_fails_cleanly_or_is_repaired(corpus_dir, tmp_path):
    data = (corpus_dir / "contract-cerence-ip.pdf").read_bytes()
    path = tmp_path / "truncated.pdf"
    path.write_bytes(data[: len(data) // 3])
    try:
        doc = parse_file(path, limits=LIMITS)
    except PipelineError as exc:
        assert exc.code in {"parse_error", "no_text_layer"}
    else:
        assert doc.pages and any(p.text for p in doc.pages)


def test_missing_file_and_unknown_extractor_are_pipeline_errors(corpus_dir, tmp_path):
    with pytest.raises(PipelineError, match="parse_error"):
        parse_file(tmp_path / "nope.pdf", limits=LIMITS)
    with pytest.raises(PipelineError, match="invalid_params"):
        parse_file(corpus_dir / "contract-galera-joint-filing.pdf", extractor="ocr", limits=LIMITS)


def test_form_feeds_make_pages(tmp_path):
    path = tmp_path / "pages.txt"
    path.write_text("First page text.\n\fSecond page.\fThird page, last.\n", encoding="utf-8")
    doc = parse_file(path, limits=LIMITS)
    assert doc.media_type == TEXT
    assert [p.text for p in doc.pages] == ["First page text.", "Second page.", "Third page, last."]


def test_text_without_form_feeds_gets_virtual_pages(corpus_dir):
    text = (corpus_dir / "contract-verizon-abs-service.txt").read_text(encoding="utf-8")
    pages = paginate(text, max_pages=500)
    assert "".join(p.text for p in pages) == text
    assert all(len(p.text) <= VIRTUAL_PAGE_CHARS for p in pages)
    assert len(pages) >= len(text) // VIRTUAL_PAGE_CHARS
    assert all(p.text[-1].isspace() for p in pages[:-1]), "cut at a line or word break"
    with pytest.raises(PipelineError, match="too_many_pages"):
        paginate(text, max_pages=20)


def test_cp1252_text_is_decoded(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("Caf\u00e9 na\u00efve \u2013 r\u00e9sum\u00e9".encode("cp1252"))
    assert parse_file(path, limits=LIMITS).pages[0].text == "Caf\u00e9 na\u00efve \u2013 r\u00e9sum\u00e9"


def test_markdown(tmp_path):
    path = tmp_path / "notes.bin"
    path.write_text("# Heading\n\nSome *text* here.\n\n## Second\n\nMore.\n", encoding="utf-8")
    doc = parse_file(path, limits=LIMITS)
    assert doc.media_type == MARKDOWN
    assert doc.pages[0].text.startswith("# Heading\n\nSome *text* here.")


def test_html_keeps_text_and_drops_scripts_and_styles(tmp_path):
    path = tmp_path / "page.html"
    path.write_text(
        "<!DOCTYPE html><html><head><title>Lease terms</title><style>p {color: red}</style>"
        "<script>var secret = 'drop me';</script></head><body><h1>Rent</h1><p>Rent is &euro;900 a"
        "\n   month.</p><p>Due on the 1st.<br>Late fee: 5%.</p><script>alert('x')</script>"
        "<noscript>enable js</noscript><table><tr><td>A</td><td>B</td></tr></table></body></html>",
        encoding="utf-8",
    )
    doc = parse_file(path, limits=LIMITS)
    assert doc.media_type == HTML
    text = doc.pages[0].text
    assert text == "Lease terms\n\nRent\n\nRent is \u20ac900 a month.\n\nDue on the 1st.\nLate fee: 5%.\n\nA B"
    assert "secret" not in text and "color" not in text and "alert" not in text


def _docx(paragraphs: list[str], page_break_after: int | None = None) -> bytes:
    w = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
    body = []
    for i, para in enumerate(paragraphs):
        brk = '<w:r><w:br w:type="page"/></w:r>' if i == page_break_after else ""
        body.append(f"<w:p><w:r><w:t>{para}</w:t></w:r>{brk}</w:p>")
    xml = f'<?xml version="1.0"?><w:document xmlns:w="{w}"><w:body>{"".join(body)}</w:body></w:document>'
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("[Content_Types].xml", "<Types/>")
        z.writestr("_rels/.rels", "<Relationships/>")
        z.writestr("word/document.xml", xml)
    return buf.getvalue()


def test_docx_paragraphs_and_page_breaks(tmp_path):
    path = tmp_path / "memo.docx"
    path.write_bytes(_docx(["Memo", "The parties agree.", "Signed."], page_break_after=1))
    doc = parse_file(path, limits=LIMITS)
    assert doc.media_type == DOCX
    assert [p.text for p in doc.pages] == ["Memo\n\nThe parties agree.", "Signed."]


def test_pdf_text_round_trip(tmp_path):
    path = tmp_path / "hello.pdf"
    path.write_bytes(text_pdf("Hello (world) \\ done"))
    assert parse_file(path, limits=LIMITS).pages[0].text == "Hello (world) \\ done"


def test_pypdf_takes_over_when_pdfium_cannot_open_a_file(corpus_dir, monkeypatch):
    # No corpus file is one PDFium refuses and pypdf reads, so PDFium's refusal is simulated here
    # (in-process: the child would not see a monkeypatch).
    import pypdfium2

    from pipeline.parse import pdf

    def refuse(*args, **kwargs):
        raise pypdfium2.PdfiumError("Failed to load document (PDFium: Data format error).")

    monkeypatch.setattr(pdf.pdfium, "PdfDocument", refuse)
    raw = pdf.extract_pdf(corpus_dir / "contract-galera-joint-filing.pdf", password=None, extractor="pdfium",
                          max_pages=50)
    assert len(raw.pages) == 3 and "JOINT FILING" in raw.pages[0].text.upper()
    assert raw.warnings and "extracted with pypdf" in raw.warnings[0]
    with pytest.raises(PipelineError, match="parse_error"):
        pdf.extract_pdf(corpus_dir / "hostile-no-startxref.pdf", password=None, extractor="pdfium", max_pages=50)
