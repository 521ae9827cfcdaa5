"""The extractive engine and the three task strategies on small hand-built documents."""

from __future__ import annotations

import json

import pytest

from pipeline.tasks import run_task
from pipeline.tasks.extractive.segments import MAX_SEGMENT_WORDS, split_sentences
from pipeline.tasks.schemas import NOT_STATED
from pipeline.types import PipelineError
from tests.fixtures_tasks import document_from_pages, normalized, pages_text

PAGES = [
    # page 1: what the document is
    "SUPPLY AGREEMENT\n\nThis Supply Agreement is made between Acme Corp. (the \"Buyer\") and Widget Ltd. "
    "(the \"Supplier\") for the delivery of industrial widgets. The Supplier shall deliver widgets to "
    "the Buyer every month during the term of this agreement.\n1",
    # page 2: payment
    "The Buyer shall pay each invoice within thirty (30) days of receipt. Late payments bear interest "
    "at one percent per month. Prices for widgets are fixed for the first year of the agreement.\n2",
    # page 3: law and disputes (a sentence continues onto page 4)
    "This agreement shall be governed by the laws of the State of Delaware. Any dispute shall be "
    "resolved by arbitration in Wilmington, Delaware. Either party may terminate this agreement upon "
    "ninety (90) days written notice to the other\n3",
    "party. The weather in the harbour was calm and the gulls circled the fishing boats at dawn. "
    "Notices under this agreement must be sent by registered mail to the addresses of the parties.\n4",
]


@pytest.fixture(scope="module")
def supply_doc():
    return document_from_pages(PAGES)


class Recorder:
    def __init__(self):
        self.calls: list[tuple[float, str]] = []

    def __call__(self, fraction: float, stage: str) -> None:
        self.calls.append((fraction, stage))


def assert_cites_real_text(doc, citation):
    """The cited text lies on the pages it names (and its char offsets point at it)."""
    span = normalized(doc.full_text[citation["char_start"]:citation["char_end"]])
    text = citation.get("text", span)
    assert text and text in pages_text(doc, citation["page_start"], citation["page_end"])
    assert text in span


def cited_texts(doc, result):
    return [normalized(doc.full_text[c["char_start"]:c["char_end"]]) for c in result["citations"]]


def test_split_sentences_keeps_offsets_pages_and_abbreviations(supply_doc):
    sentences = split_sentences(supply_doc)
    texts = [s.text for s in sentences]
    # "Corp." and "Ltd." do not end sentences
    assert any(t.startswith("This Supply Agreement is made between Acme Corp. (the") and "Widget Ltd." in t
               for t in texts)
    for s in sentences:
        assert normalized(supply_doc.full_text[s.char_start:s.char_end]) == s.text
        assert supply_doc.pages_for(s.char_start, s.char_end) == (s.page_start, s.page_end)
    assert "SUPPLY AGREEMENT" not in texts and "1" not in texts  # headings and page numbers dropped


def test_a_sentence_running_over_a_page_break_cites_both_pages():
    doc = document_from_pages(["The parties met in May. Either party may terminate this agreement upon",
                               "ninety (90) days written notice to the other party. Nothing else applies here."],
                              separator="\n")
    crossing = [s for s in split_sentences(doc) if s.text.startswith("Either party may terminate")]
    assert [(s.page_start, s.page_end) for s in crossing] == [(1, 2)]
    assert crossing[0].text.endswith("to the other party.")


def test_long_sentences_are_cut_at_clause_boundaries():
    clause = "the Supplier shall keep records of every shipment, "
    doc = document_from_pages(["Under this agreement " + clause * 30 + "and the end."])
    pieces = split_sentences(doc)
    assert len(pieces) > 1
    assert all(p.words <= MAX_SEGMENT_WORDS for p in pieces)
    assert all(p.text.endswith(",") for p in pieces[:-1])  # cut after a comma, not mid-clause
    assert normalized(" ".join(p.text for p in pieces)) == normalized(doc.full_text)  # nothing lost


def test_short_sentence_fast_path_spans_equal_the_word_by_word_cut():
    from pipeline.tasks.extractive import segments

    text = " \n Either party may\u00a0terminate\tthis agreement.  Ninety days 本协议 notice. \n"
    for start, end in ((0, len(text)), (3, 40), (40, len(text)), (0, 2)):
        words = [m.span() for m in segments._WORDLIKE.finditer(text, start, end)]
        expected = [(words[0][0], words[-1][1])] if words else []
        assert segments._cut_long(start, end, text) == expected


def test_chinese_text_is_segmented_and_counted_by_character():
    sentence = "本协议受纽约州法律管辖并依其解释。"  # 16 characters + the full stop
    doc = document_from_pages([sentence * 3, "双方应在三十天内支付所有发票。"])
    segments = split_sentences(doc)
    assert [s.text for s in segments] == [sentence] * 3 + ["双方应在三十天内支付所有发票。"]
    assert segments[0].words == 17 and [s.page_start for s in segments] == [1, 1, 1, 2]


def test_text_without_sentences_falls_back_to_chunks():
    doc = document_from_pages(["Revenue", "Net income Total"])  # words, but no segment of 4 words
    segments = split_sentences(doc)
    assert [(s.text, s.page_start) for s in segments] == [("Revenue", 1), ("Net income Total", 2)]


def test_summarize_stays_within_budget_cites_pages_and_is_json(extractive_engine, supply_doc):
    progress = Recorder()
    result = run_task(extractive_engine, "summarize", {"max_words": 40}, supply_doc, progress)
    json.dumps(result)
    assert result["engine"] == "extractive" and result["model"] == "all-MiniLM-L6-v2"
    assert 0 < len(result["summary"].split()) <= 40
    assert result["summary"] == " ".join(cited_texts(supply_doc, result))
    assert result["tokens_in"] == supply_doc.token_count and 0 < result["tokens_out"] <= 80
    starts = [s["char_start"] for s in result["citations"]]
    assert starts == sorted(starts)  # reading order
    assert [c["sentence"] for c in result["citations"]] == list(range(len(starts)))
    for citation in result["citations"]:
        assert_cites_real_text(supply_doc, citation)
    fractions = [f for f, _ in progress.calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and 3 <= len(fractions) <= 30
    assert {"selecting", "done"} <= {stage for _, stage in progress.calls}


def test_summarize_prefers_diverse_sentences(extractive_engine):
    repeated = "The Supplier shall deliver the widgets to the Buyer on time every single month."
    doc = document_from_pages([
        " ".join([repeated] * 6) + " The Buyer shall pay every invoice within thirty days of receipt.",
        " ".join([repeated] * 6) + " This agreement is governed by the laws of the State of Delaware.",
    ])
    result = run_task(extractive_engine, "summarize", {"max_words": 45}, doc, Recorder())
    texts = cited_texts(doc, result)
    assert texts.count(repeated) == 1, texts  # one copy, then other topics
    assert len(texts) >= 2


def test_summarize_cuts_a_single_overlong_sentence(extractive_engine):
    doc = document_from_pages(["The committee, having considered the evidence presented by every witness "
                               "over the course of many long weeks of hearings, concluded that the "
                               "project should proceed."])
    result = run_task(extractive_engine, "summarize", {"max_words": 10}, doc, Recorder())
    assert len(result["summary"].split()) == 10
    assert result["summary"] in normalized(doc.full_text)


def test_qa_finds_the_answer_sentence_and_its_page(extractive_engine, supply_doc):
    questions = ["Which state's law governs the agreement?", "When must invoices be paid?",
                 "How much notice is required to terminate?"]
    result = run_task(extractive_engine, "qa", {"questions": questions}, supply_doc, Recorder())
    json.dumps(result)
    by_question = {a["question"]: a for a in result["answers"]}
    assert [a["question"] for a in result["answers"]] == questions
    law = by_question[questions[0]]
    assert "governed by the laws of the State of Delaware" in law["answer"] and law["evidence"][0]["page_start"] == 3
    pay = by_question[questions[1]]
    assert "within thirty (30) days" in pay["answer"] and pay["evidence"][0]["page_start"] == 2
    notice = by_question[questions[2]]
    assert "ninety (90) days written notice" in notice["answer"] and notice["evidence"][0]["page_start"] == 3
    for answer in result["answers"]:
        scores = [e["score"] for e in answer["evidence"]]
        assert scores == sorted(scores, reverse=True) and answer["answer"] == answer["evidence"][0]["text"]
        assert 0.0 < answer["confidence"] <= 1.0
        for citation in answer["evidence"]:
            assert_cites_real_text(supply_doc, citation)


def test_classify_ranks_the_right_label_first(extractive_engine, supply_doc):
    labels = ["recipe for cooking", "legal contract", "sports news"]
    result = run_task(extractive_engine, "classify", {"labels": labels}, supply_doc, Recorder())
    json.dumps(result)
    assert result["label"] == "legal contract" and result["labels"] == ["legal contract"]
    assert set(result["scores"]) == set(labels)
    assert abs(sum(result["scores"].values()) - 1.0) < 1e-3
    assert result["scores"]["legal contract"] > 0.5


def test_classify_multi_label_keeps_every_fitting_label(extractive_engine):
    doc = document_from_pages([
        "The striker scored twice in the second half and the home team won the football match. "
        "The goalkeeper saved a penalty in the final minute of the game.",
        "Whisk the eggs with sugar, fold in the flour and bake the cake for forty minutes. "
        "Season the soup with salt and simmer the vegetables until soft.",
    ])
    labels = ["football match report", "cooking recipe", "tax law"]
    result = run_task(extractive_engine, "classify", {"labels": labels, "multi_label": True}, doc, Recorder())
    assert "tax law" not in result["labels"]
    assert result["scores"]["tax law"] < 0.5 <= min(result["scores"][label] for label in result["labels"])


def test_tasks_share_one_index_and_cached_embeddings(extractive_engine, supply_doc):
    run_task(extractive_engine, "summarize", {}, supply_doc, Recorder())
    entry = extractive_engine.document(supply_doc)
    question = {"question": "Where is arbitration held?"}
    run_task(extractive_engine, "qa", question, supply_doc, Recorder())
    embedded = extractive_engine.embedded_texts
    run_task(extractive_engine, "qa", question, supply_doc, Recorder())  # a re-run embeds nothing
    assert extractive_engine.document(supply_doc) is entry and extractive_engine.embedded_texts == embedded


@pytest.mark.parametrize("task, params", [("summarize", {}), ("qa", {"question": "x?"}),
                                          ("classify", {"labels": ["a", "b"]})])
def test_empty_document_is_a_clear_error(extractive_engine, task, params):
    with pytest.raises(PipelineError) as info:
        run_task(extractive_engine, task, params, document_from_pages(["  \n ", ""]), Recorder())
    assert info.value.code == "no_text_layer"


def test_run_task_revalidates_params(extractive_engine, supply_doc):
    with pytest.raises(PipelineError) as info:
        run_task(extractive_engine, "classify", {"labels": ["only one"]}, supply_doc, Recorder())
    assert info.value.code == "invalid_params"


def test_document_with_only_fragments_still_answers(extractive_engine):
    doc = document_from_pages(["1\n2\nIII\n"])  # text, but no citable sentence
    result = run_task(extractive_engine, "qa", {"question": "What is this?"}, doc, Recorder())
    assert result["answers"][0]["answer"] == NOT_STATED and result["answers"][0]["evidence"] == []
    assert result["answers"][0]["confidence"] == 0.0
    summary = run_task(extractive_engine, "summarize", {}, doc, Recorder())
    assert summary["summary"] == "" and summary["citations"] == []
    classified = run_task(extractive_engine, "classify", {"labels": ["a", "b"]}, doc, Recorder())
    assert classified["label"] in ("a", "b")
