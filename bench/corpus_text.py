"""CPU side of the MPT task benchmark: the corpus's documents as the model tasks see them, in one file.

Parses every usable document of ../shared/corpus with the project's own parser (pipeline.parse,
contained child process) and chunker (pipeline.chunk, MPT's gpt-neox-20b tokenizer, the settings'
512/64 chunks) and writes DocumentText-like records to a JSON file that travels to the GPU machine,
which has no corpus (bench/tasks_mpt.py reads it with `load_corpus`). Chunks are stored as offsets into
the full text (their text is full_text[char_start:char_end]), which keeps the file small.

Skipped: the MANIFEST's `hostile` files (what they test is containment, not throughput), the CUAD
reference .txt files (the same contracts as their .pdf twins: counting both would count them twice),
and any file the parser refuses or that has no text layer (recorded under "skipped" with its code).

--extractive also measures, on this CPU, the extractive engine end to end over the same documents:
parse + chunk (MiniLM tokenizer, what the extractive engine reads) + summarize + 3 questions +
classify, one document after another, and reports pages per second.

    python bench/corpus_text.py [--corpus ../shared/corpus] [--out .corpus-text/corpus.json]
                                [--tokenizer ../shared/tokenizers/gpt-neox-20b] [--extractive]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

from pipeline.types import Chunk, DocumentText, PageSpan

log = logging.getLogger("bench.corpus_text")
REPO = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = REPO.parent / "shared" / "corpus"
DEFAULT_TOKENIZER = REPO.parent / "shared" / "tokenizers" / "gpt-neox-20b"
DEFAULT_OUT = REPO / ".corpus-text" / "corpus.json"
MAX_BYTES = 20 << 20  # what one device call can carry beside the tree, with room to spare
CHUNK_TOKENS, OVERLAP_TOKENS = 512, 64  # config.settings defaults (chunk_tokens, chunk_overlap_tokens)
# The same task set as the GPU benchmark (bench/tasks_mpt.py imports these).
QUESTIONS = ("What is this document about?", "Who are the parties or authors named in the document?",
             "What are the key dates, amounts or figures?")
SUMMARY_TOKENS = 256
EMBEDDING_MODEL = "all-MiniLM-L6-v2"


def corpus_files(corpus: Path) -> tuple[list[tuple[Path, str]], list[dict[str, str]]]:
    """(file, kind) to parse, sorted by name; and the files left out on purpose, with why."""
    kinds: dict[str, str] = {}
    manifest = corpus / "MANIFEST.tsv"
    if manifest.is_file():
        with manifest.open(newline="") as fh:
            kinds = {row["file"]: row["kind"] for row in csv.DictReader(fh, delimiter="\t")}
    keep, left = [], []
    for path in sorted(p for p in corpus.iterdir() if p.is_file()):
        name = path.name
        if name not in kinds:  # MANIFEST, README, baselines: not documents
            continue
        if kinds[name] == "hostile":
            left.append({"name": name, "why": "hostile (containment test input)"})
        elif path.suffix == ".txt" and path.with_suffix(".pdf").is_file():
            left.append({"name": name, "why": "reference text of the .pdf beside it (same document)"})
        else:
            keep.append((path, kinds[name]))
    return keep, left


def to_record(name: str, kind: str, pages: int, doc: DocumentText) -> dict[str, Any]:
    return {"name": name, "kind": kind, "pages": pages, "tokens": doc.token_count, "full_text": doc.full_text,
            "page_spans": [[s.number, s.char_start, s.char_end] for s in doc.page_spans],
            "chunks": [[c.index, c.token_count, c.page_start, c.page_end, c.char_start, c.char_end]
                       for c in doc.chunks]}


def from_record(rec: dict[str, Any]) -> DocumentText:
    text = rec["full_text"]
    return DocumentText(
        full_text=text, page_spans=[PageSpan(n, a, b) for n, a, b in rec["page_spans"]],
        chunks=[Chunk(i, text[a:b], tc, ps, pe, a, b) for i, tc, ps, pe, a, b in rec["chunks"]],
        token_count=rec["tokens"])


def load_corpus(path: Path) -> tuple[dict[str, Any], list[tuple[dict[str, Any], DocumentText]]]:
    """(the file's header, [(record without its text, DocumentText)]) from a file this script wrote."""
    data = json.loads(Path(path).read_text())
    docs = []
    for rec in data.pop("documents"):
        doc = from_record(rec)
        docs.append(({k: v for k, v in rec.items() if k not in ("full_text", "page_spans", "chunks")}, doc))
    return data, docs


def _cpu_s() -> float:
    """CPU seconds of this process: chunking and the tasks (the parser's children are not counted: the
    pool keeps them alive, so the kernel has not added their time to ours yet)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def _noop(fraction: float, stage: str) -> None:
    pass


def extractive_tasks(engine: Any, doc: DocumentText) -> dict[str, float]:
    """Seconds per task of the benchmark's task set on the extractive engine."""
    from pipeline.tasks import run_task

    out = {}
    for task, params in (("summarize", {"max_tokens": SUMMARY_TOKENS}), ("qa", {"questions": list(QUESTIONS)}),
                         ("classify", {})):
        t0 = time.perf_counter()
        run_task(engine, task, params, doc, _noop)
        out[task] = round(time.perf_counter() - t0, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER, help="MPT's tokenizer dir (chunking)")
    ap.add_argument("--extractive", action="store_true", help="also time the extractive engine end to end")
    ap.add_argument("--limit", type=int, default=None, help="only the first N usable files")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from pipeline.chunk import build_document_text
    from pipeline.parse import ParseLimits, parse_file
    from pipeline.tokens import load_tokenizer
    from pipeline.types import PipelineError

    files, left_out = corpus_files(args.corpus)
    files = files[: args.limit]
    mpt_tok = load_tokenizer(str(args.tokenizer))
    limits = ParseLimits(max_pages=2000, timeout_s=300, memory_mb=2048)
    engine = mini_tok = None
    if args.extractive:
        from pipeline.tasks import load_engine

        t0 = time.perf_counter()
        engine = load_engine("extractive", model="unused", device="cpu", embedding_model=EMBEDDING_MODEL)
        mini_tok = load_tokenizer(EMBEDDING_MODEL)
        engine_load_s = round(time.perf_counter() - t0, 2)
    records, skipped, timings = [], [], []
    started, cpu0 = time.perf_counter(), _cpu_s()
    for path, kind in files:
        t0 = time.perf_counter()
        try:
            parsed = parse_file(path, limits=limits)
        except PipelineError as exc:
            skipped.append({"name": path.name, "code": exc.code, "message": exc.message[:200]})
            continue
        parse_s = time.perf_counter() - t0
        doc = build_document_text(parsed.pages, tokenizer=mpt_tok, chunk_tokens=CHUNK_TOKENS,
                                  overlap_tokens=OVERLAP_TOKENS)
        if not doc.full_text.strip():
            skipped.append({"name": path.name, "code": "no_text_layer", "message": "no extractable text"})
            continue
        records.append(to_record(path.name, kind, len(parsed.pages), doc))
        row: dict[str, Any] = {"name": path.name, "pages": len(parsed.pages), "mpt_tokens": doc.token_count,
                               "parse_s": round(parse_s, 3)}
        if engine is not None:
            t1 = time.perf_counter()
            mini_doc = build_document_text(parsed.pages, tokenizer=mini_tok, chunk_tokens=CHUNK_TOKENS,
                                           overlap_tokens=OVERLAP_TOKENS)
            row["chunk_s"] = round(time.perf_counter() - t1, 3)
            row["tasks_s"] = extractive_tasks(engine, mini_doc)
            row["end_to_end_s"] = round(parse_s + row["chunk_s"] + sum(row["tasks_s"].values()), 3)
        timings.append(row)
        log.info("%s: %s", path.name, row)
    wall, cpu = time.perf_counter() - started, _cpu_s() - cpu0

    header = {"version": 1, "tokenizer": args.tokenizer.name, "chunk_tokens": CHUNK_TOKENS,
              "overlap_tokens": OVERLAP_TOKENS, "left_out": left_out, "skipped": skipped}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    blob = json.dumps({**header, "documents": records}, separators=(",", ":"))
    if len(blob) > MAX_BYTES:
        raise SystemExit(f"{args.out}: {len(blob)} bytes is over the {MAX_BYTES}-byte limit; use --limit")
    args.out.write_text(blob)
    pages = sum(r["pages"] for r in records)
    report: dict[str, Any] = {
        "out": str(args.out), "bytes": len(blob), "documents": len(records), "pages": pages,
        "mpt_tokens": sum(r["tokens"] for r in records), "left_out": len(left_out),
        "skipped": skipped, "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "load_avg_end": round(os.getloadavg()[0], 1)}
    if engine is not None:
        e2e = sum(t["end_to_end_s"] for t in timings)
        report["extractive"] = {
            "engine_load_s": engine_load_s, "wall_s": round(wall, 2), "end_to_end_s": round(e2e, 2),
            "cpu_s_main_process": round(cpu, 2),
            "pages_per_s": round(pages / e2e, 2), "docs_per_hour": round(len(records) / e2e * 3600, 1),
            "parse_s": round(sum(t["parse_s"] for t in timings), 2),
            "chunk_s": round(sum(t["chunk_s"] for t in timings), 2),
            **{f"{task}_s": round(sum(t["tasks_s"][task] for t in timings), 2)
               for task in ("summarize", "qa", "classify")},
            "slowest": sorted(timings, key=lambda t: -t["end_to_end_s"])[:3],
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
