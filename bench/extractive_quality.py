"""Extractive quality on ../shared/corpus, through the public run_task (so it runs against any version:
point PYTHONPATH at an older checkout for a same-run baseline).

- classify: accuracy with the default labels (contract, report, paper, form, other) on the corpus
  PDFs whose MANIFEST kind is contract, report or paper.
- qa, CUAD: per contract, one plain question per CUAD category its annotators marked (the questions of
  bench/extractive_qa_cuad.py), CUAD_HELD_OUT's and CUAD_FRESH's (held out: never tuned on); a hit when a cited evidence segment lies inside an annotated clause or
  holds one; also top-1 (the answer itself).
- qa, 10-Q: the docugami QnA rows on the two 10-Qs; a hit when the evidence holds the answer's key
  figure (ANSWER_KEYS, read off the annotated answers).
- the two cases of issue 10: governing law (an addendum naming another state must not win) and
  "total revenue for the quarter" (not a segment's revenue).

    python bench/extractive_quality.py [--json out.json]
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus"
DEFAULT_LABELS = ["contract", "report", "paper", "form", "other"]
CUAD_QUESTIONS = {
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
# Held out: plain questions for other CUAD categories, written once and never used to choose a rule,
# a weight or an expansion (2026-12-02); their figure says whether a change generalizes beyond the
# questions above, which QA was tuned on.
CUAD_HELD_OUT = {
    "Parties": "Who are the parties to the agreement?",
    "Effective Date": "When does the agreement take effect?",
    "Renewal Term": "Does the agreement renew automatically?",
    "Termination For Convenience": "Can a party terminate the agreement without cause?",
    "Change Of Control": "What happens if a party undergoes a change of control?",
    "License Grant": "What license is granted under the agreement?",
    "Ip Ownership Assignment": "Who owns the intellectual property created under the agreement?",
    "Post-Termination Services": "What obligations continue after the agreement ends?",
    "Minimum Commitment": "Is there a minimum purchase or order commitment?",
    "Warranty Duration": "How long does the warranty last?",
    "Non-Transferable License": "Is the license transferable?",
    "Irrevocable Or Perpetual License": "Is the license perpetual or irrevocable?",
    "Covenant Not To Sue": "Does a party agree not to sue or challenge the other's rights?",
    "Uncapped Liability": "Is any liability unlimited?",
    "Revenue/Profit Sharing": "Is revenue or profit shared between the parties?",
}
# Fresh: every other CUAD category the corpus contracts' annotators marked, one plain question each,
# written before any change of the session that added them (2026-12-02) without reading the answers,
# and run only before and after that work: the honest figure of what QA does on questions nobody tuned on.
CUAD_FRESH = {
    "Document Name": "What is the title of this agreement?",
    "Most Favored Nation": "Is a party guaranteed terms at least as good as those given to others?",
    "Competitive Restriction Exception": "Are there exceptions to the restrictions on competing?",
    "No-Solicit Of Customers": "Is a party barred from soliciting the other's customers?",
    "No-Solicit Of Employees": "Can a party hire or solicit the other's employees?",
    "Non-Disparagement": "Are the parties prohibited from disparaging each other?",
    "Rofr/Rofo/Rofn": "Does a party have a right of first refusal or first offer?",
    "Joint Ip Ownership": "Is any intellectual property jointly owned?",
    "Affiliate License-Licensor": "Does the license cover intellectual property of the licensor's affiliates?",
    "Affiliate License-Licensee": "Can the licensee's affiliates use the licensed rights?",
    "Source Code Escrow": "Is source code held in escrow?",
    "Liquidated Damages": "Are there liquidated damages or a termination fee?",
    "Third Party Beneficiary": "Can a third party enforce the agreement?",
}
TENQ = {"2022 Q3 AAPL": "report-aapl-10q-2022q3.pdf", "2023 Q1 NVDA": "report-nvda-10q-2023q1.pdf"}
# The figure (or phrase) of each annotated answer that evidence must hold, by question prefix.
ANSWER_KEYS = {
    "What was Apple's cash flow from operating activities": ["98,024"],
    "How did Apple's inventory levels": ["5,433"],
    "How did NVIDIA's operating expenses compare": ["34.9", "2,508"],
    "How much did NVIDIA allocate to research and development": ["1,875"],
    "What changes in debt and interest expense": ["10,954", "66"],
    "For NVIDIA's Q1 2023 10-Q, what is the relationship between R&D": ["research and development"],
    "For NVIDIA's Q1 2023 10-Q, compare the details of debt": ["notes due", "1,250"],
}
ISSUE_CASES = [  # (pdf, question, a string the answer must hold)
    ("report-nvda-10q-2023q1.pdf", "What was total revenue for the quarter?", "7,192|7.19 billion"),
    ("report-aapl-10q-2022q3.pdf", "What was total net sales for the quarter?", "82,959"),
    ("contract-verizon-abs-service.pdf", "Which state's law governs this agreement?", "New York"),
    ("contract-zogenix-distributor.pdf", "Which state's law governs this agreement?", "New York"),
]


def plain(text: str) -> str:
    for fancy, simple in (("“", '"'), ("”", '"'), ("’", "'"), ("‘", "'")):
        text = text.replace(fancy, simple)
    return " ".join(text.split())


def manifest() -> list[dict[str, str]]:
    with open(CORPUS / "MANIFEST.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def cuad_clauses() -> dict[str, dict[str, list[str]]]:
    source = {Path(r["source_path"]).name: r["file"] for r in manifest()}
    with open(CORPUS / "annotations" / "cuad-master-clauses-shared.csv", newline="") as f:
        rows = {source[r["Filename"]]: r for r in csv.DictReader(f) if r["Filename"] in source}
    return {pdf: {c: [plain(x) for x in ast.literal_eval(row[c] or "[]")] for c in {**CUAD_QUESTIONS, **CUAD_HELD_OUT, **CUAD_FRESH}}
            for pdf, row in rows.items()}


def tenq_rows() -> list[tuple[str, str, list[str]]]:
    with open(CORPUS / "annotations" / "docugami-10q-qna-shared.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        pdf = next(p for key, p in TENQ.items() if key in row["Source Docs"])
        keys = next(v for prefix, v in ANSWER_KEYS.items() if row["Question"].startswith(prefix))
        out.append((pdf, row["Question"], keys))
    return out


def in_clause(text: str, clauses: list[str]) -> bool:
    """text lies inside an annotated clause or holds one; spaces are ignored in the comparison, since
    CUAD's text of a PDF and ours split words differently ("14t h day" vs "14th day")."""
    t = plain(text)
    if len(t.split()) < 5:
        return False
    t, bare = t.replace(" ", ""), [c.replace(" ", "") for c in clauses]
    return any(t in c or c in t for c in bare if c)


class Runner:
    def __init__(self) -> None:
        from pipeline.chunk import build_document_text
        from pipeline.parse import ParseLimits, parse_file
        from pipeline.tasks import load_engine, run_task
        from pipeline.tokens import load_tokenizer

        self.engine = load_engine("extractive", model="unused", device="cpu", embedding_model="all-MiniLM-L6-v2")
        self.tokenizer = load_tokenizer("all-MiniLM-L6-v2")
        self._parse, self._limits, self._build, self.run_task = parse_file, ParseLimits(2000, 300, 2048), \
            build_document_text, run_task
        self.task_s = 0.0

    def doc(self, pdf: str):  # noqa: ANN201
        parsed = self._parse(CORPUS / pdf, limits=self._limits)
        return self._build(parsed.pages, tokenizer=self.tokenizer, chunk_tokens=512, overlap_tokens=64)

    def task(self, task: str, params: dict, doc) -> dict:  # noqa: ANN001
        t0 = time.perf_counter()
        out = self.run_task(self.engine, task, params, doc, lambda f, s: None)
        self.task_s += time.perf_counter() - t0
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    r = Runner()
    report: dict = {"classify": {}, "cuad": [], "cuad_held_out": [], "cuad_fresh": [], "tenq": [], "issue_cases": []}
    kinds = {row["file"]: row["kind"] for row in manifest() if row["file"].endswith(".pdf")
             and row["kind"] in ("contract", "report", "paper")}
    clauses = cuad_clauses()
    docs = {}
    for pdf, kind in sorted(kinds.items()):
        docs[pdf] = doc = r.doc(pdf)
        got = r.task("classify", {"labels": DEFAULT_LABELS}, doc)["label"]
        report["classify"][pdf] = [kind, got]
        for key, questions in (("cuad", CUAD_QUESTIONS), ("cuad_held_out", CUAD_HELD_OUT), ("cuad_fresh", CUAD_FRESH)):
            if pdf not in clauses:
                break
            asked = [c for c in questions if clauses[pdf][c]]
            result = r.task("qa", {"questions": [questions[c] for c in asked]}, doc)
            for category, answer in zip(asked, result["answers"], strict=True):
                texts = [e["text"] for e in answer["evidence"]]
                report[key].append({"pdf": pdf, "category": category, "top1": in_clause(answer["answer"], clauses[pdf][category]),
                                    "evidence": any(in_clause(t, clauses[pdf][category]) for t in texts)})
        print(f"{pdf}: {kind} -> {got}", flush=True)
    for pdf, question, keys in tenq_rows():
        answer = r.task("qa", {"questions": [question]}, docs[pdf])["answers"][0]
        held = " ".join(e["text"] for e in answer["evidence"]).lower()
        report["tenq"].append({"question": question[:70], "evidence": any(k.lower() in held for k in keys),
                               "answer": answer["answer"][:160]})
    for pdf, question, expected in ISSUE_CASES:
        answer = r.task("qa", {"questions": [question]}, docs[pdf])["answers"][0]
        report["issue_cases"].append({"pdf": pdf, "question": question, "ok": any(e.lower() in answer["answer"].lower() for e in expected.split("|")),
                                      "answer": answer["answer"][:200]})
    classify_ok = sum(k == g for k, g in report["classify"].values())
    report["summary"] = {
        "classify_accuracy": f"{classify_ok}/{len(report['classify'])}",
        "cuad_top1": f"{sum(x['top1'] for x in report['cuad'])}/{len(report['cuad'])}",
        "cuad_evidence": f"{sum(x['evidence'] for x in report['cuad'])}/{len(report['cuad'])}",
        "cuad_held_out_evidence": f"{sum(x['evidence'] for x in report['cuad_held_out'])}/{len(report['cuad_held_out'])}",
        "cuad_held_out_top1": f"{sum(x['top1'] for x in report['cuad_held_out'])}/{len(report['cuad_held_out'])}",
        "cuad_fresh_evidence": f"{sum(x['evidence'] for x in report['cuad_fresh'])}/{len(report['cuad_fresh'])}",
        "cuad_fresh_top1": f"{sum(x['top1'] for x in report['cuad_fresh'])}/{len(report['cuad_fresh'])}",
        "tenq_evidence": f"{sum(x['evidence'] for x in report['tenq'])}/{len(report['tenq'])}",
        "issue_cases": f"{sum(x['ok'] for x in report['issue_cases'])}/{len(report['issue_cases'])}",
        "task_seconds": round(r.task_s, 1),
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
