"""What parsing every file of the shared corpus must end in (default limits, no password).

Used by the parse tests (pipeline.parse.parse_file directly) and by the workers' whole-corpus test
(through a real worker). Page counts are PDFium's, which equal MANIFEST.tsv's pypdf counts for
every PDF that both read. min_chars is a floor on the cleaned text (about 80% of pypdf's raw count
in MANIFEST.tsv: cleaning drops repeated headers/footers and page numbers).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PDF = "application/pdf"
TEXT = "text/plain"
MARKDOWN = "text/markdown"


@dataclass(frozen=True)
class Expected:
    status: str  # "parsed" or "failed"
    code: str | None = None  # failure code when status == "failed"
    media_type: str | None = None
    pages: int | None = None  # exact page count when parsed
    min_chars: int = 1
    pypdf_code: str | None = None  # the pypdf extractor fails this file with this code
    password: str | None = None  # opens with this password (tests of the password path)


def _parsed_pdf(pages: int, manifest_chars: int) -> Expected:
    return Expected("parsed", media_type=PDF, pages=pages, min_chars=max(1, int(manifest_chars * 0.8)))


EXPECTED: dict[str, Expected] = {
    "contract-verizon-abs-service.pdf": _parsed_pdf(106, 287959),
    "contract-zogenix-distributor.pdf": _parsed_pdf(68, 174800),
    "contract-bonton-agency.pdf": _parsed_pdf(61, 160867),
    "contract-energous-strategic-alliance.pdf": _parsed_pdf(32, 81840),
    "contract-cerence-ip.pdf": _parsed_pdf(24, 61844),
    "contract-cybergy-affiliate.pdf": _parsed_pdf(16, 33464),
    "contract-ivillage-sponsorship.pdf": _parsed_pdf(5, 23652),
    "contract-galera-joint-filing.pdf": _parsed_pdf(3, 3856),
    "report-aapl-10q-2022q3.pdf": _parsed_pdf(28, 69534),  # empty-user-password encryption
    "report-nvda-10q-2023q1.pdf": _parsed_pdf(49, 147056),  # empty-user-password encryption
    "report-opm-annual-performance-fy2013.pdf": _parsed_pdf(70, 197901),
    "report-dhs-strategic-plan-2020.pdf": _parsed_pdf(36, 96602),
    "report-gsa-strategic-plan-2022.pdf": _parsed_pdf(41, 106947),
    "report-federal-register-2020-17221.pdf": _parsed_pdf(15, 60085),
    "report-ntsb-accident-nyc08ca055.pdf": _parsed_pdf(4, 5759),  # empty-user-password encryption
    "report-ibm-redpaper-sampled.pdf": _parsed_pdf(18, 33807),
    "report-chelsea-transport-plan-fr.pdf": _parsed_pdf(65, 86513),
    "paper-olmocr2.pdf": _parsed_pdf(11, 36269),
    "paper-specter-acl2020.pdf": _parsed_pdf(13, 55364),
    "paper-semantic-scholar-naacl2018.pdf": _parsed_pdf(8, 34186),
    "paper-mapreduce-osdi04.pdf": _parsed_pdf(13, 55755),
    "paper-layoutparser-empty-pages.pdf": _parsed_pdf(4, 5554),
    "paper-two-column-reading-order.pdf": _parsed_pdf(14, 51712),
    "form-sf424-page2.pdf": _parsed_pdf(1, 730),
    "form-pdflatex-fields.pdf": _parsed_pdf(1, 19),
    "form-pdffill-demo.pdf": _parsed_pdf(7, 1561),
    "other-arabic-rotated.pdf": _parsed_pdf(4, 84),
    "other-latex-multicolumn.pdf": _parsed_pdf(3, 7113),
    "other-nih-protocol-nct06152367.pdf": _parsed_pdf(21, 70338),
    "other-korean-tables.pdf": _parsed_pdf(1, 1282),
    # hostile
    "hostile-encrypted-aes256-userpw.pdf": Expected("failed", "password_required", password="password"),
    "hostile-copy-protected-ownerpw.pdf": _parsed_pdf(2, 5554),  # owner password only: opens
    "hostile-empty-0-bytes.pdf": Expected("failed", "empty_file"),
    "hostile-scanned-no-text.pdf": Expected("failed", "no_text_layer"),
    "hostile-irs-irm-400pages.pdf": _parsed_pdf(400, 336132),
    "hostile-xref-loop.pdf": _parsed_pdf(30, 264),
    # PDFium repairs the missing startxref; pypdf cannot open the file at all.
    "hostile-no-startxref.pdf": Expected("parsed", media_type=PDF, pages=1, min_chars=300,
                                         pypdf_code="parse_error"),
    "hostile-odt-renamed.pdf": Expected("failed", "unsupported_media_type"),
    "hostile-corrupted-zen.pdf": _parsed_pdf(1, 920),
    # the non-PDF files of the corpus are documents too (plain text, Markdown)
    "contract-verizon-abs-service.txt": Expected("parsed", media_type=TEXT, min_chars=280_000),
    "contract-zogenix-distributor.txt": Expected("parsed", media_type=TEXT, min_chars=170_000),
    "contract-bonton-agency.txt": Expected("parsed", media_type=TEXT, min_chars=150_000),
    "contract-energous-strategic-alliance.txt": Expected("parsed", media_type=TEXT, min_chars=80_000),
    "contract-cerence-ip.txt": Expected("parsed", media_type=TEXT, min_chars=60_000),
    "contract-cybergy-affiliate.txt": Expected("parsed", media_type=TEXT, min_chars=33_000),
    "contract-ivillage-sponsorship.txt": Expected("parsed", media_type=TEXT, min_chars=21_000),
    "contract-galera-joint-filing.txt": Expected("parsed", media_type=TEXT, min_chars=3_800),
    "README.md": Expected("parsed", media_type=MARKDOWN, min_chars=900),
    "MANIFEST.tsv": Expected("parsed", media_type=TEXT, min_chars=15_000),
    "pypdf-baseline.tsv": Expected("parsed", media_type=MARKDOWN, min_chars=2_500),  # starts with "# "
    "annotations/cuad-master-clauses-shared.csv": Expected("parsed", media_type=TEXT, min_chars=1_000),
    "annotations/docugami-10q-qna-shared.csv": Expected("parsed", media_type=MARKDOWN, min_chars=1_000),
}


def corpus_files(corpus_dir: Path) -> list[str]:
    """Every file of the corpus, relative to it (what EXPECTED must cover)."""
    return sorted(str(p.relative_to(corpus_dir)) for p in corpus_dir.rglob("*") if p.is_file())


def parsed_pdfs() -> list[str]:
    return [name for name, e in EXPECTED.items() if e.status == "parsed" and e.media_type == PDF]
