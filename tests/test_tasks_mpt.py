"""The MPT task strategies (pipeline/tasks/mpt/) on the real ServingEngine (CPU, float32) over a tiny
random checkpoint with a 512-token context.

Random weights write garbage, so these tests check structure and invariants: result schemas, which
strategy ran (whole document vs map-reduce / retrieval), citations inside real pages, the shared
document token prefix across tasks, requests submitted together, calibration math, family rules.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest

from pipeline.engine.core.requests import (
    GenerateRequest,
    GenerateResult,
    ScoreRequest,
)
from pipeline.engine.init_checkpoint import synthetic_text
from pipeline.engine.serving import EngineConfig, ServingEngine
from pipeline.tasks import load_engine, run_task
from pipeline.tasks.mpt import classify, qa, summarize
from pipeline.tasks.mpt.common import session
from pipeline.tasks.mpt.engine import MptEngine
from pipeline.tasks.mpt.prompts import FAMILY_SPECS, PromptBuilder, detect_family, resolve_family
from pipeline.tasks.schemas import NOT_STATED
from pipeline.types import DocumentText, PipelineError
from tests.fixtures_tasks import document_from_pages

pytestmark = pytest.mark.usefixtures("engine_single_thread")

CONTEXT = 512
NEOX = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "gpt-neox-20b"
BLOCK = 16  # small KV blocks: a short test document still fills several, so prefix caching shows


class _RecordedFuture(Future):
    """The engine's future as the task sees it, noting when the task first waits for it."""

    def __init__(self, events: list[tuple[str, str]], request_id: str) -> None:
        super().__init__()
        self._events, self._rid = events, request_id

    def result(self, timeout: float | None = None):
        self._events.append(("result", self._rid))
        return super().result(timeout)


class Recording:
    """The real ServingEngine behind a recorder of every request and of submits vs. waits."""

    def __init__(self, serving) -> None:
        self.inner = serving
        self.tokenizer, self.max_model_len, self.model_name = serving.tokenizer, serving.max_model_len, serving.model_name
        self.requests: list[GenerateRequest | ScoreRequest] = []
        self.events: list[tuple[str, str]] = []

    def submit(self, request) -> Future:
        self.requests.append(request)
        self.events.append(("submit", request.request_id))
        proxy = _RecordedFuture(self.events, request.request_id)

        def relay(done: Future) -> None:
            error = done.exception()
            proxy.set_exception(error) if error is not None else proxy.set_result(done.result())

        self._submit(request).add_done_callback(relay)
        return proxy

    def _submit(self, request) -> Future:
        return self.inner.submit(request)

    def cancel(self, request_id: str) -> None:
        self.events.append(("cancel", request_id))
        self.inner.cancel(request_id)


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.engine.init_checkpoint import init_checkpoint

    return init_checkpoint("tiny", tmp_path_factory.mktemp("tiny-mpt-512"), seed=3, max_seq_len=CONTEXT)


@pytest.fixture(scope="module")
def serving(small_ckpt: Path) -> Iterator[ServingEngine]:
    engine = ServingEngine.load(small_ckpt, device="cpu", config=EngineConfig(block_size=BLOCK))
    yield engine
    engine.shutdown()


@pytest.fixture
def engine(serving: ServingEngine, small_ckpt: Path) -> MptEngine:
    return MptEngine(Recording(serving), model=str(small_ckpt))


def _pages(seed: int, n_pages: int, words: int) -> list[str]:
    text = " ".join(synthetic_text(seed, n_words=n_pages * words)).split()
    return [" ".join(text[i * words:(i + 1) * words]) for i in range(n_pages)]


@pytest.fixture(scope="module")
def short_doc() -> DocumentText:
    return document_from_pages(_pages(5, 2, 60), chunk_words=40)


@pytest.fixture(scope="module")
def long_doc() -> DocumentText:
    return document_from_pages(_pages(6, 8, 220), chunk_words=90)  # ~2,500 tokens: 5x the context


def _run(module, task: str, engine, doc, params: dict) -> dict:
    """Through the registry, as a worker runs it (params validated, result checked against its model)."""
    seen: list[tuple[float, str]] = []
    result = run_task(engine, task, params, doc, lambda f, st: seen.append((f, st)))
    assert seen and all(0.0 <= f <= 1.0 for f, _ in seen) and seen[-1] == (1.0, "done")
    assert module.__name__ == f"pipeline.tasks.mpt.{task}"
    return result


def _assert_spans_on_pages(doc: DocumentText, span: dict) -> None:
    assert 0 <= span["char_start"] < span["char_end"] <= len(doc.full_text)
    pages = {p.number: p for p in doc.page_spans}
    first, last = pages[span["page_start"]], pages[span["page_end"]]
    assert first.char_start <= span["char_start"] and span["char_end"] <= last.char_end
    assert doc.pages_for(span["char_start"], span["char_end"]) == (span["page_start"], span["page_end"])


def test_family_detection_rule(tmp_path: Path) -> None:
    cases = {
        "mosaicml/mpt-7b-storywriter": "completion", "mosaicml/mpt-7b": "completion",
        "mosaicml/mpt-7b-instruct": "instruct", "mosaicml/mpt-30b-instruct": "instruct",
        "mosaicml/mpt-7b-chat": "chat", "/models/MPT-7B-Chat-8k/": "chat",
        "/home/chat/models/mpt-7b": "completion",  # only the checkpoint's own name counts
        "/srv/instructions-archive/mpt-7b-storywriter": "completion",  # "instructions" is not "instruct"
        "/root/.cache/huggingface/hub/models--mosaicml--mpt-7b-instruct/snapshots/ab12cd": "instruct",
    }
    for name, family in cases.items():
        assert detect_family(name) == family, name
    local = tmp_path / "weights"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"_name_or_path": "mosaicml/mpt-7b-instruct"}))
    assert detect_family(str(local)) == "instruct"
    assert resolve_family("mosaicml/mpt-7b-chat", "completion").name == "completion"
    assert resolve_family("mosaicml/mpt-7b-chat", "auto").name == "chat"
    with pytest.raises(ValueError):
        resolve_family("x", "alpaca")
    with pytest.raises(ValueError):
        MptEngine(object(), model="x", prompt_family="alpaca")


def _mpt_chat_tokenizer():
    """MPT's real tokenizer (gpt-neox-20b) with ChatML's markers added as special tokens, as in MPT-7B-Chat."""
    from tokenizers import Tokenizer as HFTokenizer

    from pipeline.engine.tokenizer import Tokenizer

    inner = HFTokenizer.from_file(str(NEOX / "tokenizer.json"))
    inner.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return Tokenizer(inner)


@pytest.mark.parametrize("real_tokenizer", [False, True])
def test_every_family_puts_the_same_document_ids_first(serving, short_doc: DocumentText, real_tokenizer) -> None:
    tok = _mpt_chat_tokenizer() if real_tokenizer else serving.tokenizer
    chat = PromptBuilder(tok, FAMILY_SPECS["chat"], tok.eos_token_id)
    if real_tokenizer:  # <|im_end|> is one special token that decoding drops: the engine must stop on its id
        (im_end,) = chat.stop_token_ids
        assert tok.decode([im_end]) == "" and tok.encode("<|im_end|>") == [im_end]
    else:
        assert chat.stop_token_ids == ()
    for family in FAMILY_SPECS.values():
        b = PromptBuilder(tok, family, tok.eos_token_id)
        doc_ids = b.document(short_doc.full_text)
        prefix = b.prefix(doc_ids)
        tasks = [summarize.summary_task(50, "bullets", "fees"), qa.qa_task("Who pays?"), qa.qa_task("When?"),
                 classify.classify_task(["contract", "report"])]
        for task in tasks:
            p = b.prompt(doc_ids, task)
            assert p.ids[:len(prefix)] == prefix and p.prefix_len == len(prefix) < len(p.ids)
        labels = [b.label_ids(tasks[-1], x) for x in ("contract", "report")]
        assert labels[0] != labels[1] and all(len(x) >= 2 for x in labels)  # label + end of answer


def test_whole_document_tasks_share_the_prefix_and_match_the_schemas(engine, serving, short_doc: DocumentText
                                                                    ) -> None:
    s = session(engine)
    prefix = s.builder.prefix(s.builder.document(short_doc.full_text))
    full_blocks = len(prefix) // BLOCK * BLOCK
    hits = serving.stats()["prefix_hit_tokens"]
    answers = _run(qa, "qa", engine, short_doc, {"questions": ["Who pays the fees?", "What is the term?",
                                                                "Which law governs?"]})
    # 3 questions submitted together on a document the engine never saw: its prefix is prefilled once
    assert serving.stats()["prefix_hit_tokens"] - hits >= 2 * full_blocks
    hits = serving.stats()["prefix_hit_tokens"]
    summary = _run(summarize, "summarize", engine, short_doc, {"max_words": 20, "style": "bullets", "focus": "fees"})
    assert serving.stats()["prefix_hit_tokens"] - hits >= full_blocks  # a later job of the document: cached
    label = _run(classify, "classify", engine, short_doc, {})
    assert summary["method"] == answers["method"] == label["method"] == "whole_document"
    assert summary["engine"] == "mpt" and summary["model"] == engine.serving.model_name
    assert summary["tokens_in"] == len(prefix) - len(s.builder.head_ids)
    assert len(summary["summary"].split()) <= 20
    for c in summary["citations"]:
        _assert_spans_on_pages(short_doc, c)
    for a in answers["answers"]:
        assert 0.0 <= a["confidence"] <= 1.0 and a["answer"]
        assert (a["answer"] == NOT_STATED) == (not a["evidence"])
        for e in a["evidence"]:
            _assert_spans_on_pages(short_doc, e)
            assert " ".join(short_doc.full_text[e["char_start"]:e["char_end"]].split()) == e["text"]
    assert math.isclose(sum(label["scores"].values()), 1.0, abs_tol=1e-4)
    assert label["labels"] == [label["label"]] and label["label"] in label["scores"]
    requests = engine.serving.requests
    doc_requests = [r for r in requests if len(getattr(r, "prompt_ids", getattr(r, "prefix_ids", []))) > len(prefix)]
    assert len(doc_requests) == 1 + 3 + 1  # summary, 3 questions, the document's score request
    for r in doc_requests:
        ids = r.prompt_ids if isinstance(r, GenerateRequest) else r.prefix_ids
        assert ids[:len(prefix)] == prefix
    # the 3 questions were all submitted before the first was waited for (one batch for the engine)
    qa_ids = {r.request_id for r in requests[:3]}
    events = [e for e in engine.serving.events if e[1] in qa_ids]
    assert [kind for kind, _ in events[:3]] == ["submit"] * 3
    # classification: the same labels scored after the document and after 2 content-free prompts
    scores = [r for r in requests if isinstance(r, ScoreRequest)]
    assert len(scores) == 3 and all(r.continuations == scores[0].continuations for r in scores)
    assert _run(classify, "classify", engine, short_doc, {}) == label  # deterministic


def test_long_document_runs_map_reduce_retrieval_and_leading_retrieval(engine, long_doc: DocumentText) -> None:
    s = session(engine)
    assert len(s.builder.document(long_doc.full_text)) > 3 * CONTEXT
    summary = _run(summarize, "summarize", engine, long_doc, {"max_words": 20})
    assert summary["method"] == "map_reduce"
    map_requests = engine.serving.requests[:]
    windows = [r for r in map_requests if len(r.prompt_ids) > CONTEXT // 2]
    assert len(windows) >= 4  # the document's windows, each within the context with its output budget
    assert all(len(r.prompt_ids) + r.params.max_new_tokens <= CONTEXT for r in map_requests)
    submits = [k for k, _ in engine.serving.events[:len(windows)]]
    assert submits == ["submit"] * len(windows)  # window summaries submitted together
    assert summary["tokens_in"] >= len(s.builder.document(long_doc.full_text)) * 0.95
    for c in summary["citations"]:
        _assert_spans_on_pages(long_doc, c)

    answers = _run(qa, "qa", engine, long_doc, {"questions": ["What is the governing law?", "Who is the licensee?"]})
    assert answers["method"] == "retrieval"
    for a in answers["answers"]:
        for e in a["evidence"]:
            _assert_spans_on_pages(long_doc, e)
    label = _run(classify, "classify", engine, long_doc, {"labels": ["contract", "invoice", "report"],
                                                           "multi_label": True})
    assert label["method"] == "leading_retrieval" and label["label"] == label["labels"][0]
    for r in engine.serving.requests:
        ids = r.prompt_ids if isinstance(r, GenerateRequest) else r.prefix_ids
        assert len(ids) + (r.params.max_new_tokens if isinstance(r, GenerateRequest)
                           else max(map(len, r.continuations))) <= CONTEXT


def test_windows_cover_the_document_in_order_within_budget(engine, long_doc: DocumentText) -> None:
    s = session(engine)
    wins = summarize.windows(s, long_doc, 300)
    assert len(wins) >= 8 and all(0 < len(w.ids) <= 300 for w in wins)
    assert wins[0].char_start == long_doc.chunks[0].char_start and wins[-1].char_end == long_doc.chunks[-1].char_end
    assert all(a.char_end <= b.char_start for a, b in zip(wins, wins[1:], strict=False))
    text = " ".join(s.builder.tokenizer.decode(w.ids) for w in wins)
    assert " ".join(text.split()) == " ".join(long_doc.full_text.split())


def test_an_oversized_question_fails_the_job_with_context_too_long(engine, short_doc: DocumentText) -> None:
    question = " ".join(random.Random(0).choice(["notwithstanding", "indemnify", "licensor"]) for _ in range(600))
    with pytest.raises(PipelineError) as err:
        qa.run(engine, short_doc, {"questions": [question, "Who pays?"]}, lambda f, st: None)
    assert err.value.code == "context_too_long"


def test_calibration_cancels_the_label_prior() -> None:
    doc = [-1.0, -2.0, -6.0]  # "contract" is likelier after the document...
    free = [[-0.5, -4.0, -6.0], [-0.7, -4.2, -6.2]]  # ...but the prompt alone makes it likelier still
    scores = classify.calibrated_scores(doc, free, [1, 1, 3])
    assert scores == pytest.approx([-0.4, 2.1, 0.1])
    probs = classify.softmax(scores)
    assert math.isclose(sum(probs), 1.0) and max(range(3), key=probs.__getitem__) == 1
    per_token = classify.calibrated_scores(doc, free, [1, 1, 3], normalize="per_token")
    assert per_token == pytest.approx([-0.4, 2.1, 0.1 / 3])
    assert classify.choose(["a", "b", "c"], probs, False) == ("b", ["b"])
    assert classify.choose(["a", "b", "c"], [0.41, 0.41, 0.18], True) == ("a", ["a", "b"])  # a tie keeps label order
    assert classify.choose(["a", "b", "c"], [0.5, 0.26, 0.24], True) == ("a", ["a", "b"])
    with pytest.raises(ValueError):
        classify.calibrated_scores(doc, free, [1, 1, 1], normalize="mean")


def test_answers_not_stated_and_confidence() -> None:
    for said in ("", "Not stated in the document.", "N/A", "The document does not say.", "unknown.",
                 "It is not mentioned in the text", "There is no information about it"):
        assert qa.says_not_stated(said), said
    for said in ("Delaware law governs.", "None of the fees are refundable.", "Notice in writing",
                 "Unknown persons may not enter"):
        assert not qa.says_not_stated(said), said
    from pipeline.tasks.mpt.retrieve import Evidence

    evidence = [Evidence("This Agreement is governed by the laws of Delaware.", 0, 10, 1, 1, 1.0)]
    assert qa.supported("Delaware", evidence) and qa.supported("Yes.", evidence)
    assert not qa.supported("California", evidence) and not qa.supported("Ohio", [])
    result = GenerateResult("x", [1, 2], "stop", 5, 0, [math.log(0.5), math.log(0.8)])
    assert qa.confidence(result) == pytest.approx(math.sqrt(0.4))


def test_trim_keeps_whole_sentences_or_bullets() -> None:
    text = "One two three four. Five six seven eight. Nine ten eleven twelve."
    assert summarize.trim(text, 9, "paragraph") == "One two three four. Five six seven eight."
    assert summarize.trim(text, 100, "paragraph") == text
    assert summarize.trim("- a b c\n- d e f\n- g h i", 9, "bullets") == "- a b c\n- d e f"  # "-" is a word
    assert summarize.trim("one two three four five six seven eight nine ten", 4, "paragraph") == "one two three four"


class Scripted(Recording):
    """Generation answers with given text (as a model that read the document would): exercises the
    answer post-processing, evidence and citations that random weights never reach."""

    def __init__(self, serving, answers: list[str]) -> None:
        super().__init__(serving)
        self.answers = list(answers)

    def _submit(self, request) -> Future:
        if isinstance(request, ScoreRequest):
            return self.inner.submit(request)
        text = self.answers.pop(0)
        ids = self.tokenizer.encode(text)
        done: Future = Future()
        done.set_result(GenerateResult(text, ids, "stop", len(request.prompt_ids), 0, [math.log(0.9)] * len(ids)))
        return done


def _sentence_on_page(doc: DocumentText, page: int) -> str:
    span = doc.page_spans[page - 1]
    words = doc.full_text[span.char_start:span.char_end].split()
    return " ".join(words[20:34]) + "."


@pytest.mark.parametrize(("family", "embedding_model"), [("completion", "all-MiniLM-L6-v2"), ("chat", None)])
def test_answers_and_summary_sentences_cite_the_page_they_come_from(serving, small_ckpt, long_doc, family,
                                                                    embedding_model) -> None:
    """With and without retrieval's embedding half (BM25 alone)."""
    on_page_3, on_page_6 = _sentence_on_page(long_doc, 3), _sentence_on_page(long_doc, 6)
    im_end = "<|im_end|>" if family == "chat" else ""
    scripted = Scripted(serving, [
        on_page_3 + im_end, "Not stated in the document.", "Zanzibar Quixotic Xylophones.",
        *["part summary."] * 40])
    engine = MptEngine(scripted, model=str(small_ckpt), prompt_family=family, embedding_model=embedding_model)
    result = _run(qa, "qa", engine, long_doc, {"questions": [f"Is it so that {on_page_3[:-1]}?", "Who signed?",
                                                              "Where is the venue?"]})
    first, second, third = result["answers"]
    assert first["answer"] == on_page_3 and first["confidence"] == pytest.approx(0.9)
    assert first["evidence"] and first["evidence"][0]["page_start"] == 3
    for e in first["evidence"]:
        _assert_spans_on_pages(long_doc, e)
    assert second["answer"] == NOT_STATED and second["evidence"] == [] and second["confidence"] == pytest.approx(0.9)
    # words found nowhere in what the model read: said plainly, with the complement as confidence
    assert third["answer"] == NOT_STATED and third["confidence"] == pytest.approx(0.1)

    s = session(engine)
    cites = summarize.citations(s, long_doc, f"{on_page_6} {on_page_3}")
    assert [(c["sentence"], c["page_start"]) for c in cites] == [(0, 6), (1, 3)]
    for c in cites:
        _assert_spans_on_pages(long_doc, c)


def test_load_engine_mpt_on_cpu_runs_through_the_registry(small_ckpt: Path, short_doc: DocumentText) -> None:
    engine = load_engine("mpt", model=str(small_ckpt), device="cpu", embedding_model="all-MiniLM-L6-v2")
    try:
        assert isinstance(engine, MptEngine) and engine.kind == "mpt" and engine.tokenizer_spec == str(small_ckpt)
        result = run_task(engine, "classify", {"labels": ["contract", "report"]}, short_doc, lambda f, st: None)
        assert result["method"] == "whole_document" and result["model"] == str(small_ckpt)
    finally:
        engine.shutdown()


def test_map_reduce_combines_in_rounds_until_the_summaries_fit(serving, small_ckpt: Path) -> None:
    doc = document_from_pages(_pages(7, 24, 220), chunk_words=90)  # ~7,000 tokens: ~20 windows
    part = " ".join(_pages(8, 1, 36)[0].split()) + "."  # a window summary near its token budget
    scripted = Scripted(serving, [part] * 200)
    engine = MptEngine(scripted, model=str(small_ckpt))
    s = session(engine)
    result, tokens_in, rounds = summarize.map_reduce(s, doc, 20, 28, "paragraph", None, lambda f, st: None)
    assert rounds >= 2 and result.text == part
    assert tokens_in >= 0.95 * len(s.builder.document(doc.full_text))
    for r in scripted.requests:
        assert len(r.prompt_ids) + r.params.max_new_tokens <= CONTEXT
    n_windows = len(summarize.windows(s, doc, s.budget(summarize.summary_task(34, "paragraph", None, scope="part"),
                                                       48)))
    assert n_windows >= 15 and len(scripted.requests) > n_windows + 1  # windows, >= 1 middle round, the final


def test_pack_keeps_document_order_budget_and_a_too_long_best_chunk(engine, long_doc: DocumentText) -> None:
    from pipeline.tasks.mpt.common import pack

    s = session(engine)
    chunks = long_doc.chunks
    packed = pack(s, long_doc, [chunks[5], chunks[1], chunks[2], chunks[9]], 300)
    assert len(packed.ids) <= 300 and packed.spans == sorted(packed.spans)
    assert {c.index for c in packed.chunks} <= {1, 2, 5, 9} and chunks[5] in packed.chunks
    tiny = pack(s, long_doc, [chunks[3], chunks[0]], 20)
    assert len(tiny.ids) == 20 and tiny.chunks == [chunks[3]]
    assert s.builder.tokenizer.decode(tiny.ids).split()[0] == chunks[3].text.split()[0]


def test_a_documents_tasks_build_its_sentence_index_once(engine, monkeypatch) -> None:
    """QA's evidence and the summary's citations search the same sentences: one index per document
    (each build is tens of ms of Python holding the GIL beside the engine's thread)."""
    from pipeline.tasks.mpt import retrieve

    builds: list[int] = []
    real = retrieve.document_passages
    monkeypatch.setattr(retrieve, "document_passages", lambda doc, unit: builds.append(id(doc)) or real(doc, unit))
    doc = document_from_pages(_pages(11, 2, 60), chunk_words=40)
    _run(qa, "qa", engine, doc, {"questions": ["Who pays the fees?"]})
    _run(summarize, "summarize", engine, doc, {"max_words": 20})
    assert builds == [id(doc)]
    other = document_from_pages(_pages(12, 2, 60), chunk_words=40)
    _run(qa, "qa", engine, other, {"questions": ["Who pays the fees?"]})
    assert builds == [id(doc), id(other)]


def test_content_free_priors_are_scored_once_per_engine_and_label_set(engine, monkeypatch) -> None:
    monkeypatch.setattr(classify, "_PRIORS", classify._Priors())
    first, second = (document_from_pages(_pages(seed, 2, 60), chunk_words=40) for seed in (13, 14))
    labels = {"labels": ["contract", "report", "invoice"]}

    def score_requests() -> int:
        return sum(isinstance(r, ScoreRequest) for r in engine.serving.requests)

    _run(classify, "classify", engine, first, labels)
    assert score_requests() == 3  # the document's and the 2 content-free prompts'
    reused = _run(classify, "classify", engine, second, labels)
    assert score_requests() == 4  # the next document: its own only
    _run(classify, "classify", engine, second, {"labels": ["contract", "report"]})
    assert score_requests() == 7  # another label set is another prior
    monkeypatch.setattr(classify, "_PRIORS", classify._Priors())
    recomputed = _run(classify, "classify", engine, second, labels)
    # the same scores as recomputed (float32 noise aside: what the prefix cache holds changes which
    # positions a forward computes, here and without the cache alike)
    assert recomputed["label"] == reused["label"] and recomputed["labels"] == reused["labels"]
    for lb, p in recomputed["scores"].items():
        assert math.isclose(p, reused["scores"][lb], abs_tol=1e-4)
