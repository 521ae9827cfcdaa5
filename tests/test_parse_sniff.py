"""Media-type sniffing from bytes: real corpus files plus the renamed/binary cases the API must refuse."""

from __future__ import annotations

import io
import zipfile

import pytest

from pipeline.parse import sniff_media_type
from pipeline.parse.sniff import DOCX, HTML, MARKDOWN, PDF, TEXT


def _head(path) -> bytes:
    with open(path, "rb") as f:
        return f.read(8192)


def test_every_corpus_pdf_but_the_hostile_non_pdfs_is_sniffed_as_pdf(corpus_dir):
    for path in sorted(corpus_dir.glob("*.pdf")):
        expected = None if path.name in {"hostile-odt-renamed.pdf", "hostile-empty-0-bytes.pdf"} else PDF
        assert sniff_media_type(_head(path)) == expected, path.name


def test_cuad_reference_texts_are_plain_text(corpus_dir):
    for path in sorted(corpus_dir.glob("contract-*.txt")):
        assert sniff_media_type(_head(path)) == TEXT, path.name


def test_renamed_odt_is_unsupported(corpus_dir):
    assert _head(corpus_dir / "hostile-odt-renamed.pdf").startswith(b"PK")
    assert sniff_media_type(_head(corpus_dir / "hostile-odt-renamed.pdf")) is None


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"", None),
        (b"\x00\x01\x02\x03binary", None),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", None),
        (b"junk before header\r\n%PDF-1.7\n", PDF),
        (b"<!DOCTYPE html>\n<html><body>x</body></html>", HTML),
        (b"  <!-- c -->\n<HTML lang=en><p>x", HTML),
        (b"# Title\n\nSome text.\n", MARKDOWN),
        (b"Intro\n\n- one\n- two\n- three\n\nSee [docs](http://x.y).\n", MARKDOWN),
        (b"Dear sir,\nplease find the agreement attached.\n", TEXT),
        ("Caf\u00e9 cr\u00e8me".encode("cp1252"), TEXT),
        ("r\u00e9sum\u00e9 ".encode() * 2000, TEXT),  # multi-byte char cut at the 8 KiB window
        ("\ufeffhello".encode("utf-16"), TEXT),
    ],
)
def test_sniff_small_inputs(head, expected):
    assert sniff_media_type(head) == expected


def test_docx_zip_is_recognised_and_other_zips_are_not():
    def make(names):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for name in names:
                z.writestr(name, "<x/>")
        return buf.getvalue()

    assert sniff_media_type(make(["[Content_Types].xml", "_rels/.rels", "word/document.xml"])) == DOCX
    assert sniff_media_type(make(["data.csv"])) is None
