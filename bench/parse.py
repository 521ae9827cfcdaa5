"""Parse + clean + chunk throughput over the shared corpus, against plain pypdf and plain pypdfium2.

Every PDF of the corpus that all three read is processed, one file at a time, in this order per
file so machine load hits every contender alike:
  1. plain pypdf:      PdfReader(f).pages[i].extract_text() for every page
  2. plain pypdfium2:  PdfDocument(f)[i].get_textpage().get_text_range() for every page
  3. longdoc in-process, by stage: extract (PDFium + pypdf for labels/encryption), clean, tokenize,
     cut chunks (pipeline.parse.extract + pipeline.chunk)
  4. longdoc end to end as a worker runs it: parse_file (contained child process) + chunking
CPU seconds (process time) for 1-3, wall seconds for 4 (the child's time is not ours to count).
Then a memory pass: every document in a fresh parser child; its peak RSS is that document's.

Usage: python bench/parse.py [--corpus DIR] [--tokenizer SPEC] [--repeat N]
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import time
from pathlib import Path

import pypdf
import pypdfium2 as pdfium

from pipeline.chunk import build_document_text
from pipeline.clean import clean_pages
from pipeline.parse import ParseLimits, ParserPool
from pipeline.parse.extract import _finish, parse_in_process
from pipeline.parse.pdf import extract_pdf, mark_headings
from pipeline.parse.supervisor import _Child
from pipeline.tokens import load_tokenizer

log = logging.getLogger("bench.parse")
LIMITS = ParseLimits(max_pages=2000, timeout_s=300, memory_mb=2048)
CHUNK_TOKENS, OVERLAP = 512, 64


def plain_pypdf(path: Path) -> int:
    reader = pypdf.PdfReader(path)
    for page in reader.pages:
        page.extract_text()
    return len(reader.pages)


def plain_pdfium(path: Path) -> int:
    doc = pdfium.PdfDocument(str(path))
    for i in range(len(doc)):
        doc[i].get_textpage().get_text_range()
    n = len(doc)
    doc.close()
    return n


def staged(path: Path, tokenizer) -> dict[str, float]:
    """longdoc in this process, timed per stage (CPU seconds)."""
    t0 = time.process_time()
    raw = extract_pdf(path, password=None, extractor="pdfium", max_pages=LIMITS.max_pages)
    t1 = time.process_time()
    clean_pages([mark_headings(p.text, raw.headings) for p in raw.pages])
    t2 = time.process_time()
    doc = _finish("application/pdf", raw)  # cleans again + page accounting, as parse_file does
    t3 = time.process_time()
    full = "\n\n".join(p.text for p in doc.pages)
    tokenizer.offsets(full)
    t4 = time.process_time()
    build_document_text(doc.pages, tokenizer=tokenizer, chunk_tokens=CHUNK_TOKENS, overlap_tokens=OVERLAP)
    t5 = time.process_time()
    return {"extract": t1 - t0, "clean": t2 - t1, "tokenize": t4 - t3, "chunk_total": t5 - t4,
            "end_to_end_cpu": (t1 - t0) + (t3 - t2) + (t5 - t4)}


def end_to_end(pool: ParserPool, path: Path, tokenizer) -> tuple[float, float]:
    """(wall s, CPU s of child + this process) for parse_file + chunking, as a parse worker runs it."""
    started, cpu_started, child_before = time.perf_counter(), time.process_time(), pool.child_cpu_seconds
    doc = pool.parse(path, limits=LIMITS)
    build_document_text(doc.pages, tokenizer=tokenizer, chunk_tokens=CHUNK_TOKENS, overlap_tokens=OVERLAP)
    cpu = time.process_time() - cpu_started + pool.child_cpu_seconds - child_before
    return time.perf_counter() - started, cpu


def fresh_child_peak_rss_mb(path: Path) -> float:
    child = _Child(test_hooks=False)
    try:
        child.send({"path": str(path), "password": None, "extractor": "pdfium",
                    "limits": {"max_pages": LIMITS.max_pages, "timeout_s": LIMITS.timeout_s,
                               "memory_mb": LIMITS.memory_mb, "max_bytes": None}})
        reply = child.read_reply(time.monotonic() + LIMITS.timeout_s)
        return reply["max_rss_kb"] / 1024
    finally:
        child.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "corpus")
    parser.add_argument("--tokenizer", default="all-MiniLM-L6-v2")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("pypdf").setLevel(logging.ERROR)

    tokenizer = load_tokenizer(args.tokenizer)
    pool = ParserPool()
    files = []
    for path in sorted(args.corpus.glob("*.pdf")):
        try:  # only files every contender reads (hostile files are the tests' business)
            _ = len(pypdf.PdfReader(path).pages)
            pdfium.PdfDocument(str(path)).close()
            parse_in_process(path, limits=LIMITS)
            files.append(path)
        except Exception:  # noqa: BLE001 - a file a contender cannot read is left out of the race
            log.info("skipped %s (a baseline cannot read it)", path.name)
    pool.parse(files[0], limits=LIMITS)  # start the child outside the timings

    load_before = os.getloadavg()[0]
    totals = dict.fromkeys(["pages", "pypdf", "pdfium", "extract", "clean", "tokenize", "chunk_total",
                            "end_to_end_cpu", "end_to_end_wall", "contained_cpu"], 0.0)
    for path in files:
        t = time.process_time()
        pages = plain_pypdf(path)
        totals["pypdf"] += time.process_time() - t
        t = time.process_time()
        plain_pdfium(path)
        totals["pdfium"] += time.process_time() - t
        for key, value in staged(path, tokenizer).items():
            totals[key] += value
        wall, cpu = end_to_end(pool, path, tokenizer)
        totals["end_to_end_wall"] += wall
        totals["contained_cpu"] += cpu
        totals["pages"] += pages
    load_after = os.getloadavg()[0]

    rss = {path.name: fresh_child_peak_rss_mb(path) for path in files}
    pool.close()
    pages = totals["pages"]
    rate = {k: pages / totals[k] for k in ("pypdf", "pdfium", "end_to_end_cpu", "end_to_end_wall", "contained_cpu")}
    print(f"files: {len(files)}, pages: {int(pages)}, tokenizer: {args.tokenizer}, "
          f"chunks: {CHUNK_TOKENS}/{OVERLAP} tokens, load avg {load_before:.1f} -> {load_after:.1f}")
    print("| contender | seconds | pages/s per core | vs pypdf |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| plain pypdf extract_text (CPU) | {totals['pypdf']:.2f} | {rate['pypdf']:.0f} | 1.0x |")
    print(f"| plain pypdfium2 get_text_range (CPU) | {totals['pdfium']:.2f} | {rate['pdfium']:.0f} | "
          f"{rate['pdfium'] / rate['pypdf']:.1f}x |")
    print(f"| longdoc parse+clean+chunk in-process (CPU) | {totals['end_to_end_cpu']:.2f} | "
          f"{rate['end_to_end_cpu']:.0f} | {rate['end_to_end_cpu'] / rate['pypdf']:.1f}x |")
    print(f"| longdoc parse_file (child) + chunk (CPU, child + parent) | {totals['contained_cpu']:.2f} | "
          f"{rate['contained_cpu']:.0f} | {rate['contained_cpu'] / rate['pypdf']:.1f}x |")
    print(f"| longdoc parse_file (child) + chunk (wall, loaded box) | {totals['end_to_end_wall']:.2f} | "
          f"{rate['end_to_end_wall']:.0f} | {rate['end_to_end_wall'] / rate['pypdf']:.1f}x |")
    over = totals["pdfium"]
    print(f"\nstages (CPU s): extract {totals['extract']:.2f} (plain pypdfium2 {over:.2f}), "
          f"clean {totals['clean']:.2f} (+{100 * totals['clean'] / over:.0f}% of pypdfium2), "
          f"tokenize {totals['tokenize']:.2f} (+{100 * totals['tokenize'] / over:.0f}%), "
          f"chunk cutting {totals['chunk_total'] - totals['tokenize']:.2f} "
          f"(+{100 * (totals['chunk_total'] - totals['tokenize']) / over:.0f}%)")
    worst = max(rss, key=rss.get)
    print(f"peak RSS per document (fresh parser child): max {rss[worst]:.0f} MB ({worst}), "
          f"median {sorted(rss.values())[len(rss) // 2]:.0f} MB; parent (this process, tokenizer + "
          f"chunks) peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
