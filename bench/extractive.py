"""CPU benchmark: the extractive backend's three tasks on one long real document, end to end.

Measures, on this machine: parse + chunk, backend load, summarize, qa (5 questions), classify, in
that order on a fresh backend (nothing cached), the document's end-to-end seconds (parse + chunk +
tasks), CPU seconds after the load, how many segments were embedded, peak RSS. Runs against any
version through run_task: point PYTHONPATH at an older checkout for a same-run baseline.
--baseline N also embeds N segments with each runtime (ONNX Runtime, torch), alternated.

    python bench/extractive.py [--pdf ../shared/corpus/contract-zogenix-distributor.pdf] [--baseline 128]
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
    ap.add_argument("--baseline", type=int, default=0,
                    help="segments to embed with both runtimes, ONNX Runtime and torch (0 = skip)")
    args = ap.parse_args()

    from pipeline.chunk import build_document_text
    from pipeline.parse import ParseLimits, parse_file
    from pipeline.tasks import load_engine, run_task
    from pipeline.tokens import load_tokenizer

    def noop(fraction: float, stage: str) -> None:
        pass

    report: dict = {
        "pdf": args.pdf.name,
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
    cpu_loaded = time.process_time()
    summary, report["summarize_s"] = timed(
        lambda: run_task(engine, "summarize", {"max_words": 200}, doc, noop)
    )
    answers, report["qa_5_questions_s"] = timed(
        lambda: run_task(engine, "qa", {"questions": QUESTIONS}, doc, noop)
    )
    classified, report["classify_s"] = timed(
        lambda: run_task(engine, "classify", {"labels": LABELS}, doc, noop)
    )
    report["tasks_s"] = round(report["summarize_s"] + report["qa_5_questions_s"] + report["classify_s"], 2)
    report["document_end_to_end_s"] = round(report["parse_s"] + report["chunk_s"] + report["tasks_s"], 2)
    report["cpu_s_after_load"] = round(time.process_time() - cpu_loaded, 2)
    sentences = engine.document(doc).sentences
    report.update(segments=len(sentences), segments_embedded=getattr(engine, "embedded_texts", None),
                  runtime=getattr(getattr(engine, "encoder", None), "runtime", "torch"))
    report["classify_label"] = classified["label"]
    report["qa_answers"] = {a["question"]: [(a.get("evidence") or [{}])[0].get("page_start"), a["answer"][:100]]
                            for a in answers["answers"]}

    if args.baseline:
        texts = [s.text for s in sentences[: args.baseline]]
        from pipeline.tasks.extractive.backend import ExtractiveBackend

        for runtime in ("onnx", "torch", "onnx", "torch"):  # alternated: load on this box drifts
            backend = ExtractiveBackend.load("all-MiniLM-L6-v2", runtime=runtime)
            cpu = time.process_time()
            _, wall = timed(lambda b=backend: b.embed(texts))
            report.setdefault(f"embed_{len(texts)}_{runtime}", []).append(
                {"wall_s": wall, "cpu_s": round(time.process_time() - cpu, 2)})
    report["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    report["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
