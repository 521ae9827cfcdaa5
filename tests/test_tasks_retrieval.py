"""pipeline.tasks.retrieval: BM25 (stemmed, bm25s) narrowed, embedding-fused ranking with char spans."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline.tasks.retrieval import Retriever, document_passages, search_document, terms
from tests.fixtures_tasks import document_from_pages, normalized

REPO_ROOT = Path(__file__).resolve().parents[1]

TEXTS = [
    "The Supplier shall deliver widgets to the Buyer every month.",
    "This agreement is governed by the laws of the State of Delaware.",
    "The Buyer shall pay each invoice within thirty (30) days of receipt.",
    "Either party may terminate this agreement upon ninety days written notice.",
    "The gulls circled the fishing boats at dawn.",
]


class CountingEmbedder:
    """The real backend, counting what it is asked to embed."""

    def __init__(self, backend):
        self.backend, self.texts = backend, []

    def embed(self, texts):
        self.texts.extend(texts)
        return self.backend.embed(texts)


def test_terms_are_stemmed_without_stop_words():
    assert terms("Which state's law governs the Agreement?") == terms("state law governing agreement")
    assert "30" in terms("within 30 days")


def test_a_hyphenated_compound_is_also_a_term_of_its_own():
    assert terms("a Non-Compete covenant") == ["non", "compet", "coven", "noncompet"]
    assert "nonus" in terms("confidentiality and non\u2011use")  # a non-breaking hyphen too
    assert "2" in terms("a 2-year term") and not any(t.startswith("2y") for t in terms("a 2-year term"))
    texts = ["The non-use obligations survive.", "Non-compete: the Distributor shall not sell rival products."]
    assert Retriever(texts).search("Is there a non-compete restriction?", k=2)[0].index == 1


def test_bm25_alone_ranks_by_shared_terms():
    hits = Retriever(TEXTS).search("Which law governs?", k=3)
    assert hits[0].index == 1 and hits[0].bm25 == 1.0 and hits[0].cosine is None
    assert Retriever(TEXTS).search("zebra", k=3) == []  # nothing shares a term


def test_fusion_embeds_only_the_shortlist_and_ranks_by_meaning(extractive_engine):
    counting = CountingEmbedder(extractive_engine)
    retriever = Retriever(TEXTS, embedder=counting, shortlist=2)
    hits = retriever.search("When is payment of an invoice due?", k=2)
    assert hits[0].index == 2 and hits[0].cosine > 0.3
    assert len(counting.texts) == 1 + 1  # the one text sharing a term ("invoice"), then the query
    # a query without any term of the texts: every text is a candidate, cosine decides
    hits = retriever.search("birds near ships", k=1)
    assert hits[0].index == 4 and hits[0].bm25 == 0.0


def test_rrf_fusion_and_batched_queries(extractive_engine):
    retriever = Retriever(TEXTS, embedder=extractive_engine, fusion="rrf")
    law, notice = retriever.search_many(["Which state's law governs?", "How can a party end it early?"], k=2)
    assert law[0].index == 1 and notice[0].index == 3
    assert len(law) == 1  # only texts sharing a term are candidates when any does


def test_passages_keep_char_spans_and_pages():
    doc = document_from_pages(TEXTS[:2] + [" ".join(TEXTS[2:])])
    passages = document_passages(doc)
    for p in passages:
        assert normalized(doc.full_text[p.char_start:p.char_end]) == p.text
        assert doc.pages_for(p.char_start, p.char_end) == (p.page_start, p.page_end)
    (best, hit), *_ = search_document(doc, "invoice payment days", k=2)
    assert best.page_start == 3 and "invoice" in best.text and hit.score > 0
    chunks = document_passages(doc, unit="chunk")
    assert [c.page_start for c in chunks] == [1, 2, 3]
    assert np.isclose(sum(len(c.text) > 0 for c in chunks), 3)


def test_importing_retrieval_never_imports_jax(tmp_path: Path) -> None:
    """bm25s imports JAX when installed and JAX's GPU client preallocates 75% of the GPU: a gpu worker's
    KV pool got 14 of 140 GiB on the H200. A stand-in `jax` package on the path records any import;
    retrieval must work without importing it, and leave it importable for others."""
    marker = tmp_path / "imported"
    (tmp_path / "jax").mkdir()
    (tmp_path / "jax" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('jax')\n")
    (tmp_path / "jax" / "lax.py").write_text("def top_k(x, k): raise RuntimeError('jax top_k used')\n")
    code = ("import sys\n"
            "from pipeline.tasks.retrieval import Retriever\n"
            "import bm25s.selection\n"
            "assert 'jax' not in sys.modules and not bm25s.selection.JAX_IS_AVAILABLE\n"
            "hits = Retriever(['the governing law is Delaware', 'payment within thirty days']).search('governing law', 1)\n"
            "print(hits)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO_ROOT)])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert not marker.exists()
