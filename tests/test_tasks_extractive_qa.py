"""Extractive QA's lexical pre-scoring and its document facts (qa.py, qa_facts.py), the backend's
padding-bounded batches, and the segments QA depends on (short table rows), on hand-built documents
and one corpus contract."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pipeline.tasks import run_task
from pipeline.tasks.extractive import qa, qa_facts
from pipeline.tasks.extractive.backend import MAX_BATCH, PAD_BUDGET, ExtractiveBackend, _batches
from pipeline.tasks.extractive.segments import _short_table_row, split_sentences, whole_sentence
from tests.fixtures_tasks import document_from_pages, normalized

PAGES = [
    "MASTER SUPPLY AGREEMENT\n\nThis Master Supply Agreement is made and entered into as of March 3, 2019 "
    "by and between Acme Corp. and Widget Ltd. for the supply of industrial widgets to the Buyer.\n\n"
    "1.1 Definitions 1.2 Supply of Widgets 2.1 Term 2.2 Renewal 2.5 Non-Compete Covenant 3.1 Notices\n",
    "2.1 Term.\nThis Agreement continues in effect for an initial term of seven (7) years from the Effective "
    "Date, unless earlier terminated under Section 3.\n"
    "2.5 Non-Compete Covenant.\nDuring the Term, Distributor shall not market, sell or distribute in the "
    "Territory any other product containing fenfluramine.\n"
    "8.1 Confidentiality.\nThe obligations of confidentiality and non-use shall not apply to information that is publicly known "
    "at the time of its disclosure.\n",
    "I have reviewed this quarterly report on the widget business of Acme Corp. and its affiliates.\n\n"
    "I have reviewed this quarterly report on the widget business of Acme Corp. and its affiliates.\n\n"
    "Condensed balance sheet of the Buyer (in millions)\n"
    "Cash and cash equivalents $ 27,502 $ 34,940\nInventories 5,433 6,580\n"
    "Total current assets 112,292 134,836\n",
]


@pytest.fixture(scope="module")
def contract():
    return document_from_pages(PAGES)


def _answer(engine, doc, question: str) -> dict:
    return run_task(engine, "qa", {"questions": [question]}, doc, lambda f, s: None)["answers"][0]


def test_a_clause_is_found_through_the_heading_segmentation_drops(extractive_engine, contract):
    # "2.5 Non-Compete Covenant." is too short to be a segment and the clause never says "compete";
    # the contents line names the topic but answers nothing; "non-use" shares only "non"
    answer = _answer(extractive_engine, contract, "Is there a non-compete restriction?")
    assert answer["answer"].startswith("During the Term, Distributor shall not market"), answer
    texts = [s.text for s in split_sentences(contract)]
    spans = [(s.char_start, s.char_end) for s in split_sentences(contract)]
    headings = qa_facts.section_headings(contract.full_text, spans, texts)
    clause = next(i for i, t in enumerate(texts) if t.startswith("During the Term"))
    assert headings[clause] == "2.5 Non-Compete Covenant."
    assert headings[clause + 1] == "8.1 Confidentiality."  # a heading lasts until the next one
    # the contents line's own leading number is a label, cut from its segment like a clause's
    assert qa_facts.is_contents_line(next(t for t in texts if t.startswith("Definitions 1.2")))
    assert not qa_facts.is_contents_line(texts[clause])


def test_when_it_ends_is_not_when_it_was_made(extractive_engine, contract):
    ends = _answer(extractive_engine, contract, "When does the agreement expire?")
    assert "initial term of seven (7) years" in ends["answer"], ends
    made = _answer(extractive_engine, contract, "On what date was the agreement made?")
    assert "entered into as of March 3, 2019" in made["answer"], made


def test_evidence_never_repeats_a_text(extractive_engine, contract):
    answer = _answer(extractive_engine, contract, "Who reviewed the quarterly report on the widget business?")
    texts = [e["text"] for e in answer["evidence"]]
    assert texts[0].startswith("I have reviewed this quarterly report")
    assert len(texts) == len(set(texts)) == qa.EVIDENCE


def test_a_short_table_row_is_a_segment_and_answers_its_figure(extractive_engine, contract):
    texts = [s.text for s in split_sentences(contract)]
    assert "Inventories 5,433 6,580" in texts
    assert _answer(extractive_engine, contract, "What were the inventories?")["answer"] == "Inventories 5,433 6,580"
    for not_a_row in ("June 25, 2022", "Page 3 of 10", "Article 5 6"):  # column headers, page numbers
        assert not _short_table_row(not_a_row), not_a_row
    assert _short_table_row("Goodwill 4,430 4,372") and _short_table_row("Cash $ 27,502 $ 34,940")


def test_only_the_lexical_shortlist_is_embedded(extractive_engine, cybergy_doc):
    backend = ExtractiveBackend(extractive_engine.tokens, extractive_engine.encoder, "all-MiniLM-L6-v2")
    question = "Which state's law governs this agreement?"  # not a date question: no dated extras
    result = run_task(backend, "qa", {"questions": [question]}, cybergy_doc, lambda f, s: None)
    segments = len(backend.document(cybergy_doc).sentences)
    assert segments > 100 and backend.embedded_texts <= qa.LEAD + qa.SHORTLIST + 1
    assert "governed by" in result["answers"][0]["answer"]


def test_batches_bound_padding_and_size():
    rng = np.random.default_rng(0)
    lengths = sorted(int(n) for n in rng.integers(3, 120, size=300))
    sizes = _batches(lengths)
    assert sum(sizes) == len(lengths) and _batches([]) == [] and _batches([7] * 70) == [32, 32, 6]
    start = 0
    for size in sizes:
        batch = lengths[start:start + size]
        assert size <= MAX_BATCH and (size == 1 or batch[-1] * size <= PAD_BUDGET * sum(batch))
        start += size


def test_batched_embeddings_equal_one_at_a_time(extractive_engine):
    texts = [f"Clause {i}: the Supplier shall deliver {'widgets and ' * (i % 9)}parts within {i} days."
             for i in range(40)]
    together = ExtractiveBackend(extractive_engine.tokens, extractive_engine.encoder, "m").embed(texts)  # [40, D]
    alone = ExtractiveBackend(extractive_engine.tokens, extractive_engine.encoder, "m")
    singles = np.concatenate([alone.embed([t]) for t in texts[::7]])  # [6, D]
    assert np.allclose(together[::7], singles, atol=1e-5)
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


def test_onnx_runtime_uses_the_cores_this_process_may_use(extractive_engine):
    session = getattr(extractive_engine.encoder, "session", None)
    if session is None:  # the torch fallback: nothing of ONNX Runtime to check
        assert extractive_engine.encoder.runtime == "torch"
        return
    assert session.get_session_options().intra_op_num_threads == len(os.sched_getaffinity(0))


def test_the_onnx_export_is_fused(extractive_engine):
    if extractive_engine.encoder.runtime != "onnxruntime":
        pytest.skip("the torch fallback: no ONNX export")
    onnx = pytest.importorskip("onnx")
    from pipeline.tasks.extractive.backend import resolve_embedding_model
    from pipeline.tasks.extractive.encoders import _onnx_path

    graph = onnx.load(str(_onnx_path(resolve_embedding_model("all-MiniLM-L6-v2"))), load_external_data=False).graph
    ops = {node.op_type for node in graph.node}
    assert {"Attention", "SkipLayerNormalization"} <= ops  # one fused attention per layer, not SDPA's pieces


def test_a_piece_of_a_cut_sentence_is_cited_as_the_whole_sentence(extractive_engine):
    head = ("Upon the occurrence of the Closing, and subject to the payment of the purchase price and to the "
            "other obligations of the Purchaser under this Agreement and the approval order of the court, ")
    tail = ("the Agent shall have the exclusive right to market and sell all of the remaining inventory of "
            "the stores, free of any interference from any entity or person whatsoever.")
    filler = " ".join(f"The parties met on day {n} to review the weekly store reports." for n in range(6))
    doc = document_from_pages([f"{filler} {head}{tail} {filler}"])
    pieces = [s for s in split_sentences(doc) if s.text in normalized(head + tail)]
    assert len(pieces) == 2 and pieces[0].sentence == pieces[1].sentence  # cut at MAX_SEGMENT_WORDS
    answer = _answer(extractive_engine, doc, "Does the agent have an exclusive right to sell?")
    cited = answer["evidence"][0]
    assert answer["answer"] == normalized(head + tail)
    assert normalized(doc.full_text[cited["char_start"]:cited["char_end"]]) == answer["answer"]
    whole = whole_sentence(doc, split_sentences(doc), split_sentences(doc).index(pieces[1]), max_words=40)
    assert whole == pieces[1]  # longer than max_words: the piece alone


def test_an_enumerated_clause_is_a_segment_of_its_own_without_its_label():
    # CUAD-style provisions: one per lettered item; a segment running across two holds neither whole
    doc = document_from_pages([
        "13.1 EXCEPT IN THE CASE OF FRAUD, NEITHER PARTY SHALL BE LIABLE FOR INDIRECT DAMAGES OF ANY KIND. "
        "(ii) ENERGOUS will have the right to terminate this Agreement upon written notice to DIALOG. "
        "(b) The warranty contained in this Section shall not apply to any misuse of the products. "
        "The price is 3.5 million dollars for the first year of the term of this agreement."])
    texts = [s.text for s in split_sentences(doc)]
    assert texts == ["EXCEPT IN THE CASE OF FRAUD, NEITHER PARTY SHALL BE LIABLE FOR INDIRECT DAMAGES OF ANY KIND.",
                     "ENERGOUS will have the right to terminate this Agreement upon written notice to DIALOG.",
                     "The warranty contained in this Section shall not apply to any misuse of the products.",
                     "The price is 3.5 million dollars for the first year of the term of this agreement."]
    for s in split_sentences(doc):
        assert normalized(doc.full_text[s.char_start:s.char_end]) == s.text


def test_only_a_section_title_is_embedded_with_its_segments():
    headings = ["", "11. Warranty.", "11. Warranty.", "ACME CORP NOTES TO FINANCIAL STATEMENTS", "x",
                "ACME CORP NOTES TO FINANCIAL STATEMENTS (Continued)", "x", "ACME CORP NOTES TO FINANCIAL STATEMENTS",
                "Three Months Ended April 30, 2023", "Other 62 63"]
    titles = qa_facts.section_titles(headings)
    assert titles[1] == titles[2] == "11. Warranty."
    assert titles[3:] == [""] * 7  # a running page header, a table's column heads, a dropped row


def test_a_who_question_prefers_the_sentence_naming_the_companies(extractive_engine, contract):
    answer = _answer(extractive_engine, contract, "Who are the parties to the agreement?")
    assert "by and between Acme Corp. and Widget Ltd." in answer["answer"], answer
