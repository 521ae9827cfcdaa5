"""Retrieval quality of the extractive QA strategy against CUAD's clause annotations.

For each corpus contract and each CUAD category below that the annotators marked in it, one plain
question is asked; a hit is a segment that lies inside one of the annotated clauses (or contains
one). Reports top-1 hits and MRR for the current qa.py weights and for a baseline of the same
engine with the word-overlap bonus off (pure embedding similarity), measured in the same run.

    python bench/extractive_qa_cuad.py [--pdfs contract-cybergy-affiliate.pdf ...]
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus"
QUESTIONS = {
    "Governing Law": "Which state's law governs this agreement?",
    "Expiration Date": "When does the agreement expire?",
    "Notice Period To Terminate Renewal": "How much notice is needed to terminate the agreement?",
    "Agreement Date": "On what date was the agreement made?",
    "Anti-Assignment": "Can a party assign this agreement to someone else?",
    "Cap On Liability": "Is there a limit on liability?",
    "Insurance": "What insurance must be maintained?",
    "Audit Rights": "Does a party have the right to audit the other's records?",
    "Non-Compete": "Is there a non-compete restriction?",
    "Exclusivity": "Is the arrangement exclusive?",
}
DEFAULT_PDFS = ["contract-cybergy-affiliate.pdf", "contract-ivillage-sponsorship.pdf",
                "contract-energous-strategic-alliance.pdf", "contract-zogenix-distributor.pdf",
                "contract-cerence-ip.pdf", "contract-bonton-agency.pdf"]


def plain(text: str) -> str:
    for fancy, simple in (("“", '"'), ("”", '"'), ("’", "'"), ("‘", "'")):
        text = text.replace(fancy, simple)
    return " ".join(text.split())


def annotations() -> dict[str, dict[str, list[str]]]:
    with open(CORPUS / "MANIFEST.tsv", newline="") as f:
        source = {Path(r["source_path"]).name: r["file"] for r in csv.DictReader(f, delimiter="\t")}
    with open(CORPUS / "annotations" / "cuad-master-clauses-shared.csv", newline="") as f:
        rows = {source[r["Filename"]]: r for r in csv.DictReader(f) if r["Filename"] in source}
    return {pdf: {c: [plain(x) for x in ast.literal_eval(row[c] or "[]")] for c in QUESTIONS}
            for pdf, row in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pdfs", nargs="+", default=DEFAULT_PDFS)
    args = ap.parse_args()

    from pipeline.chunk import build_document_text
    from pipeline.parse import ParseLimits, parse_file
    from pipeline.tasks import load_engine, qa
    from pipeline.tokens import load_tokenizer

    engine = load_engine("extractive", model="unused", device="cpu", embedding_model="all-MiniLM-L6-v2")
    tokenizer = load_tokenizer("all-MiniLM-L6-v2")
    labels = annotations()
    variants = {"qa.py as shipped": qa.LEXICAL_WEIGHT, "baseline: embeddings only": 0.0}
    ranks: dict[str, list[int | None]] = {name: [] for name in variants}
    for pdf in args.pdfs:
        parsed = parse_file(CORPUS / pdf, limits=ParseLimits(2000, 300, 2048))
        doc = build_document_text(parsed.pages, tokenizer=tokenizer, chunk_tokens=512, overlap_tokens=64)
        sentences, vectors = engine.sentence_vectors(doc)
        texts = [s.text for s in sentences]
        asked = [c for c in QUESTIONS if labels[pdf][c]]
        query = engine.embed([QUESTIONS[c] for c in asked])
        for name, weight in variants.items():
            shipped, qa.LEXICAL_WEIGHT = qa.LEXICAL_WEIGHT, weight
            try:
                scores = qa.rank(vectors, query, texts, [QUESTIONS[c] for c in asked])  # [S, Q]
                orders = qa.answer_order(scores, [s.words for s in sentences])  # [Q, S]
            finally:
                qa.LEXICAL_WEIGHT = shipped
            for qi, category in enumerate(asked):
                gold = {i for i, t in enumerate(texts) if len(t.split()) >= 5 and any(
                    plain(t) in clause or clause in plain(t) for clause in labels[pdf][category])}
                order = list(orders[qi])
                ranks[name].append(min((order.index(i) for i in gold), default=None))
        print(f"{pdf}: {len(asked)} questions, {len(texts)} segments", flush=True)
    report = {name: {"questions": len(r), "top1": sum(x == 0 for x in r),
                     "top3": sum(x is not None and x < 3 for x in r),
                     "mrr": round(sum(1 / (x + 1) for x in r if x is not None) / len(r), 3)}
              for name, r in ranks.items()}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
