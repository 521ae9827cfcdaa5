"""CPU benchmark: the extractive backend's three tasks on one long real document, end to end.

Measures, on this machine: parse + chunk, backend load, summarize, qa (5 questions), classify, in
that order on a fresh backend (nothing cached), the document's end-to-end seconds (parse + chunk +
tasks), CPU seconds after the load, how many segments were embedded, peak RSS. Runs against any
version through run_task: point PYTHONPATH at an older checkout for a same-run baseline.
--baseline N also embeds N segments with each runtime (ONNX Runtime, torch), alternated.
--compare DIR runs this script --repeat times for each of two versions, alternated, each in a fresh
subprocess: the checkout DIR (the seed: `git archive 59b1640 | tar -x -C DIR`) and this repo, and
prints every pair with its ratios and the load average (the dev box's 2 cores are shared, and the
seed's 2-thread torch pass slows far more under load than the new code).

    python bench/extractive.py [--pdf ../shared/corpus/contract-zogenix-distributor.pdf] [--baseline 128]
    python bench/extractive.py --compare /tmp/extractive-seed --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
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


def compare(seed: Path, repeat: int, pdf: Path) -> None:
    """Seed and this repo alternated, one fresh process per run; pairs, ratios and load averages."""
    pairs = []
    for _ in range(repeat):
        pair = {}
        for name, root in (("seed", seed), ("new", REPO)):
            out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--pdf", str(pdf)], check=True,
                                 capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)})
            run = json.loads(out.stdout)
            pair[name] = {k: run.get(k) for k in ("document_end_to_end_s", "tasks_s", "cpu_s_after_load",
                                                  "engine_load_s", "load_avg_start", "load_avg_end")}
        seed_s, new_s = pair["seed"]["document_end_to_end_s"], pair["new"]["document_end_to_end_s"]
        pair["end_to_end_ratio"] = round(seed_s / new_s, 2)
        pair["cpu_ratio"] = round(pair["seed"]["cpu_s_after_load"] / pair["new"]["cpu_s_after_load"], 2)
        pairs.append(pair)
    ratios = [p["end_to_end_ratio"] for p in pairs]
    mean = {k: round(sum(p[k]["document_end_to_end_s"] for p in pairs) / len(pairs), 2) for k in ("seed", "new")}
    print(json.dumps({"pdf": pdf.name, "pairs": pairs, "ratios": ratios, "mean_end_to_end_s": mean,
                      "ratio_of_means": round(mean["seed"] / mean["new"], 2)}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pdf", type=Path, default=DEFAULT_PDF)
    ap.add_argument("--baseline", type=int, default=0,
                    help="segments to embed with both runtimes, ONNX Runtime and torch (0 = skip)")
    ap.add_argument("--compare", type=Path, help="a checkout of the seed to run alternately with this repo")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.compare:
        compare(args.compare, args.repeat, args.pdf)
        return

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
