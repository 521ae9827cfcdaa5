"""CPU benchmark: the extractive engine's three tasks on one long real document.

Measures, on this machine: parse + chunk, engine load, summarize (which embeds every segment),
qa and classify on the cached embeddings, segments/s and tokens/s of the embedding pass, and peak
RSS. Baseline in the same run: sentence-transformers' SentenceTransformer.encode (the stock way to
run this model) on the same segments, with the cosine agreement between the two embeddings.

    python bench/extractive.py [--pdf ../shared/corpus/contract-zogenix-distributor.pdf] [--baseline 400]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PDF = REPO.parent / "shared" / "corpus" / "contract-zogenix-distributor.pdf"
QUESTIONS = [
    "Which state's law governs this agreement?",
    "How can the agreement be terminated?",
    "What is the term of the agreement?",
    "Who are the parties?",
    "What territory is covered?",
]
LABELS = ["legal contract", "research paper", "financial report", "government strategic plan"]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t0, 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pdf", type=Path, default=DEFAULT_PDF)
    ap.add_argument("--baseline", type=int, default=400, help="segments to embed both ways (0 = skip)")
    args = ap.parse_args()

    import torch

    from pipeline.chunk import build_document_text
    from pipeline.parse import ParseLimits, parse_file
    from pipeline.tasks import load_engine, run_task
    from pipeline.tokens import load_tokenizer

    def noop(fraction: float, stage: str) -> None:
        pass

    report: dict = {
        "pdf": args.pdf.name,
        "torch_threads": torch.get_num_threads(),
        "load_avg_start": os.getloadavg()[0],
    }
    tokenizer = load_tokenizer("all-MiniLM-L6-v2")
    parsed, report["parse_s"] = timed(lambda: parse_file(args.pdf, limits=ParseLimits(2000, 300, 2048)))
    doc, report["chunk_s"] = timed(
        lambda: build_document_text(parsed.pages, tokenizer=tokenizer, chunk_tokens=512, overlap_tokens=64)
    )
    report.update(pages=len(parsed.pages), tokens=doc.token_count)
    engine, report["engine_load_s"] = timed(
        lambda: load_engine("extractive", model="unused", device="cpu", embedding_model="all-MiniLM-L6-v2")
    )
    summary, report["summarize_s"] = timed(
        lambda: run_task(engine, "summarize", {"max_words": 200}, doc, noop)
    )
    sentences = engine.document(doc).sentences
    seg_tokens = sum(tokenizer.count(s.text) for s in sentences)
    report.update(
        segments=len(sentences),
        segment_tokens=seg_tokens,
        embed_segments_per_s=round(len(sentences) / report["summarize_s"], 1),
        embed_tokens_per_s=round(seg_tokens / report["summarize_s"], 1),
    )
    answers, report["qa_5_questions_cached_s"] = timed(
        lambda: run_task(engine, "qa", {"questions": QUESTIONS}, doc, noop)
    )
    classified, report["classify_cached_s"] = timed(
        lambda: run_task(engine, "classify", {"labels": LABELS}, doc, noop)
    )
    report["classify_label"] = classified["label"]
    report["qa_answers"] = {a["question"]: [a["page_start"], a["answer"][:100]] for a in answers["answers"]}

    if args.baseline:
        texts = [s.text for s in sentences[: args.baseline]]
        ours, report["baseline_ours_embed_s"] = timed(lambda: engine.embed(texts))
        from sentence_transformers import SentenceTransformer

        from pipeline.extractive import resolve_embedding_model

        st = SentenceTransformer(str(resolve_embedding_model("all-MiniLM-L6-v2")), device="cpu")
        theirs, report["baseline_sentence_transformers_embed_s"] = timed(
            lambda: st.encode(texts, batch_size=32, normalize_embeddings=True)
        )
        report["baseline_segments"] = len(texts)
        report["baseline_min_cosine"] = round(float((ours * theirs).sum(axis=1).min()), 6)
    report["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    report["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
