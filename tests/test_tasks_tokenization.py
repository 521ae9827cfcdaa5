"""Tokenizing documents for the MPT tasks without stalling the serving engine's thread.

Every task of a document runs in its own thread beside the engine thread; a 14K-65K-token document
tokenized with the GIL held stops the engine for ~0.1 s per 38K tokens, and three tasks that each
missed an lru_cache tokenized it three times (bench/NOTES.md "tasks path host overhead").
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from pipeline.engine.tokenizer import Tokenizer
from pipeline.tasks.mpt.prompts import FAMILY_SPECS, PromptBuilder

NEOX = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "gpt-neox-20b"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(NEOX)


def _long_text() -> str:
    sentence = ("the contract term renews each year unless either party gives written notice of "
                "termination ninety days before the end of the term; fees are due within thirty days")
    words = sentence.split(" ")
    return " ".join(words[(i * 7) % len(words)] + (".\n" if i % 23 == 22 else "") for i in range(120_000))


class CountingTokenizer:
    """The real tokenizer, counting (and slowing) encodes of one text, so calls overlap."""

    def __init__(self, inner: Tokenizer, watched: str, fail_first: bool = False) -> None:
        self.inner, self.watched, self.fail_first = inner, watched, fail_first
        self.calls = 0
        self._lock = threading.Lock()
        self.eos_token_id = inner.eos_token_id

    def encode(self, text: str) -> list[int]:
        if text == self.watched:
            with self._lock:
                self.calls += 1
                first = self.calls == 1
            time.sleep(0.2)  # long enough for every task thread to ask meanwhile
            if first and self.fail_first:
                raise RuntimeError("tokenizer failed")
        return self.inner.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.inner.decode(ids)


def test_concurrent_tasks_tokenize_a_document_once(tokenizer: Tokenizer) -> None:
    text = "A document every task of one job set reads. " * 400
    counting = CountingTokenizer(tokenizer, text)
    builders = [PromptBuilder(counting, FAMILY_SPECS["completion"]) for _ in range(3)]  # one per task thread
    out: list[list[int]] = [[] for _ in builders]
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, builders[i].document(text)))
               for i in range(len(builders))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counting.calls == 1
    assert out[0] == out[1] == out[2] == tokenizer.encode(text)
    assert builders[0].document(text) == out[0] and counting.calls == 1  # and later asks hit the cache


def test_a_failed_tokenization_is_not_cached(tokenizer: Tokenizer) -> None:
    text = "A document whose first tokenization fails. " * 50
    counting = CountingTokenizer(tokenizer, text, fail_first=True)
    builder = PromptBuilder(counting, FAMILY_SPECS["completion"])
    with pytest.raises(RuntimeError):
        builder.document(text)
    assert builder.document(text) == tokenizer.encode(text)
    assert counting.calls == 2


def _wakeups_during(work) -> tuple[int, float, list]:
    """How often this thread woke from 1 ms sleeps while `work` ran in another thread (it cannot
    wake while that thread holds the GIL), the seconds it ran, and what it returned."""
    done = threading.Event()
    out: list = []

    def run() -> None:
        out.append(work())
        done.set()

    worker = threading.Thread(target=run)
    wakeups = 0
    started = time.perf_counter()
    worker.start()
    while not done.is_set():
        time.sleep(0.001)
        wakeups += 1
    elapsed = time.perf_counter() - started
    worker.join()
    return wakeups, elapsed, out[0]


def test_encoding_a_long_document_lets_other_threads_run(tokenizer: Tokenizer) -> None:
    """While one thread tokenizes ~170K tokens, another thread (the engine's) keeps waking up: a
    tokenizer holding the GIL throughout lets it wake at most once or twice."""
    text = _long_text()
    wakeups, elapsed, ids = _wakeups_during(lambda: tokenizer.encode(text))
    assert len(ids) > 100_000
    assert elapsed > 0.05  # the encode took long enough for the count to mean something
    assert wakeups >= 10, f"{wakeups} wake-ups in {elapsed:.2f} s of tokenization"
    assert ids == tokenizer.inner.encode(text, add_special_tokens=False).ids


def test_chunking_offsets_let_other_threads_run() -> None:
    """The chunker's whole-document pass (embedded mode runs it in the engine's process)."""
    from pipeline.tokens import load_tokenizer

    counter = load_tokenizer(str(NEOX))
    text = _long_text()
    wakeups, elapsed, offsets = _wakeups_during(lambda: counter.offsets(text))
    assert elapsed > 0.05 and wakeups >= 10, f"{wakeups} wake-ups in {elapsed:.2f} s of tokenization"
    assert offsets == counter._tokenizer.encode(text, add_special_tokens=False).offsets
    assert counter.ids(text[:5000]) == counter._tokenizer.encode(text[:5000], add_special_tokens=False).ids
