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
from tests.fixtures_parse import decompression_bomb_pdf, fanout_pages_pdf, text_pdf, xobject_fanout_pdf

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


def _children() -> set[int]:
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


@pytest.mark.parametrize("extractor", ["pdfium", "pypdf"])
def test_endless_xobject_fanout_is_stopped(extractor, parser_pool, tmp_path):
    # 16**8 text draws per page. pypdf gives up on a page after 5,000 form XObject invocations
    # (seconds each), PDFium expands the fan-out in memory: with 20 such pages neither finishes.
    path = tmp_path / "fanout.pdf"
    path.write_bytes(fanout_pages_pdf(pages=20))
    started = time.monotonic()
    with pytest.raises(PipelineError) as failure:
        parser_pool.parse(path, extractor=extractor, limits=ParseLimits(50, timeout_s=3, memory_mb=1024))
    assert failure.value.code in ({"parse_timeout", "parse_memory"} if extractor == "pdfium" else {"parse_timeout"})
    assert time.monotonic() - started < 30
    _assert_pool_still_works(parser_pool, tmp_path)


def test_one_fanout_page_is_contained_too(parser_pool, tmp_path):
    path = tmp_path / "fanout1.pdf"
    path.write_bytes(xobject_fanout_pdf(depth=8, fan_out=16))
    with pytest.raises(PipelineError) as failure:
        parser_pool.parse(path, limits=ParseLimits(50, timeout_s=3, memory_mb=1024))
    assert failure.value.code in {"parse_timeout", "parse_memory"}
    _assert_pool_still_works(parser_pool, tmp_path)


def test_spinning_child_is_killed_at_the_time_limit(hook_pool, tmp_path):
    path = tmp_path / "ok.pdf"
    path.write_bytes(text_pdf("fine"))
    hook_pool.parse(path, limits=SMALL)  # start a child
    (spinner,) = [c.proc.pid for c in hook_pool._idle]
    assert psutil.pid_exists(spinner)
    started = time.monotonic()
    with pytest.raises(PipelineError) as failure:
        hook_pool.parse(path, limits=ParseLimits(50, timeout_s=1.0, memory_mb=512), hook="spin")
    elapsed = time.monotonic() - started
    assert failure.value.code == "parse_timeout"
    assert 1.0 <= elapsed < 10
    assert spinner not in _children(), "the spinning child must be gone (killed and reaped)"
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


@pytest.mark.parametrize("extractor", ["pdfium", "pypdf"])
def test_page_limit_is_enforced_before_extraction(extractor, parser_pool, tmp_path):
    # Extracting even one page of this file would run into the time limit; counting pages does not.
    path = tmp_path / "many-endless-pages.pdf"
    path.write_bytes(fanout_pages_pdf(pages=60))
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


def test_a_child_that_cannot_start_is_an_infrastructure_error(monkeypatch, tmp_path):
    import sys

    from pipeline.parse.supervisor import ParserUnavailable

    path = tmp_path / "ok.pdf"
    path.write_bytes(text_pdf("fine"))
    pool = ParserPool()
    monkeypatch.setattr(sys, "executable", "/bin/false")  # the child exits before saying ready
    with pytest.raises(ParserUnavailable):
        pool.parse(path, limits=SMALL)
    monkeypatch.undo()
    assert pool.parse(path, limits=SMALL).pages[0].text == "fine"
    pool.close()
