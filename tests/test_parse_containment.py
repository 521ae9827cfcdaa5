"""Hostile files are contained: a decompression bomb and an endless XObject fan-out fail only their
own document (parse_memory / parse_timeout), the calling process is unharmed and the next document
parses normally. Limits on pages are enforced before any text is extracted.
"""

from __future__ import annotations

import resource
import time

import psutil
import pytest

from pipeline.parse import ParseLimits, ParserPool, parse_file
from pipeline.types import PipelineError
from tests.fixtures_parse import (
    build_pdf,
    decompression_bomb_pdf,
    pdf_stream,
    text_pdf,
    xobject_fanout_pdf,
)

SMALL = ParseLimits(max_pages=50, timeout_s=60, memory_mb=512)


@pytest.fixture
def hook_pool():
    pool = ParserPool(test_hooks=True)
    yield pool
    pool.close()


def _assert_pool_still_works(pool: ParserPool, tmp_path) -> None:
    path = tmp_path / "after.pdf"
    path.write_bytes(text_pdf("still parsing after the hostile file"))
    doc = pool.parse(path, limits=SMALL)
    assert doc.pages[0].text == "still parsing after the hostile file"


def _children(pool: ParserPool) -> set[int]:
    return {c.pid for c in psutil.Process().children()}


@pytest.mark.parametrize("extractor", ["pdfium", "pypdf"])
def test_decompression_bomb_is_contained(extractor, parser_pool, tmp_path):
    path = tmp_path / "bomb.pdf"
    path.write_bytes(decompression_bomb_pdf(inflated_mb=1024))  # 1 GiB of spaces from ~1 MB
    assert path.stat().st_size < 2 * 1024 * 1024
    rss_before = psutil.Process().memory_info().rss
    with pytest.raises(PipelineError) as failure:
        parser_pool.parse(path, extractor=extractor, limits=ParseLimits(50, timeout_s=120, memory_mb=384))
    # PDFium aborts at the address-space limit (the child dies: parse_memory); pypdf refuses the
    # stream at its own decompression limit (parse_error). Either way a clear message, no text.
    assert failure.value.code in {"parse_memory", "parse_error"}, failure.value
    assert failure.value.code == ("parse_memory" if extractor == "pdfium" else "parse_error")
    assert psutil.Process().memory_info().rss - rss_before < 100 * 1024 * 1024
    _assert_pool_still_works(parser_pool, tmp_path)


def test_endless_xobject_fanout_hits_the_time_limit_with_pypdf(parser_pool, tmp_path):
    path = tmp_path / "fanout.pdf"
    path.write_bytes(xobject_fanout_pdf(depth=8, fan_out=16))  # 16**8 = 4.3e9 text draws
    started = time.monotonic()
    with pytest.raises(PipelineError) as failure:
        parser_pool.parse(path, extractor="pypdf", limits=ParseLimits(50, timeout_s=3, memory_mb=1024))
    assert failure.value.code == "parse_timeout"
    assert time.monotonic() - started < 20
    _assert_pool_still_works(parser_pool, tmp_path)


def test_endless_xobject_fanout_is_stopped_with_pdfium(parser_pool, tmp_path):
    path = tmp_path / "fanout.pdf"
    path.write_bytes(xobject_fanout_pdf(depth=8, fan_out=16))
    started = time.monotonic()
    with pytest.raises(PipelineError) as failure:
        parser_pool.parse(path, limits=ParseLimits(50, timeout_s=3, memory_mb=1024))
    # PDFium expands the fan-out in memory: whichever limit comes first stops it.
    assert failure.value.code in {"parse_timeout", "parse_memory"}
    assert time.monotonic() - started < 20
    _assert_pool_still_works(parser_pool, tmp_path)


def test_spinning_child_is_killed_at_the_time_limit(hook_pool, tmp_path):
    path = tmp_path / "ok.pdf"
    path.write_bytes(text_pdf("fine"))
    hook_pool.parse(path, limits=SMALL)  # start a child
    before = _children(hook_pool)
    started = time.monotonic()
    with pytest.raises(PipelineError) as failure:
        hook_pool.parse(path, limits=ParseLimits(50, timeout_s=1.0, memory_mb=512), hook="spin")
    elapsed = time.monotonic() - started
    assert failure.value.code == "parse_timeout"
    assert 1.0 <= elapsed < 10
    assert not (before & _children(hook_pool)), "the spinning child must be gone"
    _assert_pool_still_works(hook_pool, tmp_path)


def test_allocating_child_fails_parse_memory(hook_pool, tmp_path):
    path = tmp_path / "ok.pdf"
    path.write_bytes(text_pdf("fine"))
    with pytest.raises(PipelineError) as failure:
        hook_pool.parse(path, limits=ParseLimits(50, timeout_s=60, memory_mb=400), hook="allocate")
    assert failure.value.code == "parse_memory"
    assert "400 MB" in failure.value.message
    _assert_pool_still_works(hook_pool, tmp_path)


def test_hooks_are_ignored_by_ordinary_children(parser_pool, tmp_path):
    path = tmp_path / "ok.pdf"
    path.write_bytes(text_pdf("hooks are for tests"))
    doc = parser_pool.parse(path, limits=ParseLimits(50, timeout_s=5, memory_mb=512), hook="spin")
    assert doc.pages[0].text == "hooks are for tests"


def _fanout_pages_pdf(pages: int) -> bytes:
    """`pages` pages that all draw one endless XObject fan-out: any text extraction would time out."""
    first_page, font = 3, 3 + pages
    content, xobject0 = font + 1, font + 2
    form = b"/Type /XObject /Subtype /Form /BBox [0 0 612 792]"
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [%s] /Count %d >>"
               % (b" ".join(b"%d 0 R" % (first_page + i) for i in range(pages)), pages)]
    depth = 8
    top = xobject0 + depth
    objects += [b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /XObject << /X %d 0 R >> "
                b">> /Contents %d 0 R >>" % (top, content)] * pages
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    objects.append(pdf_stream(b"q /X Do Q"))
    objects.append(pdf_stream(b"BT /F1 12 Tf 72 720 Td (loop) Tj ET",
                              form + b" /Resources << /Font << /F1 %d 0 R >> >>" % font))
    for level in range(1, depth + 1):
        objects.append(pdf_stream(b" ".join([b"q /X Do Q"] * 16),
                                  form + b" /Resources << /XObject << /X %d 0 R >> >>" % (xobject0 + level - 1)))
    return build_pdf(objects)


@pytest.mark.parametrize("extractor", ["pdfium", "pypdf"])
def test_page_limit_is_enforced_before_extraction(extractor, parser_pool, tmp_path):
    # Extracting even one page of this file would run into the time limit; counting pages does not.
    path = tmp_path / "many-endless-pages.pdf"
    path.write_bytes(_fanout_pages_pdf(pages=60))
    with pytest.raises(PipelineError) as failure:
        parser_pool.parse(path, extractor=extractor, limits=ParseLimits(max_pages=50, timeout_s=20, memory_mb=1024))
    assert failure.value.code == "too_many_pages"
    assert "60 pages" in failure.value.message


def test_page_limit_on_a_real_long_document(corpus_dir):
    with pytest.raises(PipelineError) as failure:
        parse_file(corpus_dir / "hostile-irs-irm-400pages.pdf",
                   limits=ParseLimits(max_pages=100, timeout_s=60, memory_mb=1024))
    assert failure.value.code == "too_many_pages"
    assert "400" in failure.value.message


def test_byte_limit_is_enforced_before_reading(corpus_dir):
    with pytest.raises(PipelineError) as failure:
        parse_file(corpus_dir / "report-chelsea-transport-plan-fr.pdf",
                   limits=ParseLimits(max_pages=100, timeout_s=60, memory_mb=1024, max_bytes=1_000_000))
    assert failure.value.code == "too_large"


def test_concurrent_callers_each_get_their_own_child(parser_pool, corpus_dir):
    from concurrent.futures import ThreadPoolExecutor

    names = ["contract-galera-joint-filing.pdf", "contract-ivillage-sponsorship.pdf"] * 3
    with ThreadPoolExecutor(3) as executor:
        docs = list(executor.map(lambda n: parser_pool.parse(corpus_dir / n, limits=SMALL), names))
    assert [len(d.pages) for d in docs] == [3, 5] * 3


def test_parent_memory_limit_is_untouched(parser_pool, tmp_path):
    _assert_pool_still_works(parser_pool, tmp_path)
    assert resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY
