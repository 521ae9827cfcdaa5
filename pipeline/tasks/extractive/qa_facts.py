"""What QA scores a document's segments against, derived once per document and cached on its index.

- windows: BM25 over each segment with its neighbours and its section heading. Headings are often
  too short to be segments of their own ("2.5 Non-Compete Covenant.", "Section 8.3 Termination."
  are dropped by segmentation), yet they name what the section's clauses are about, so the text
  dropped between two segments, or a segment that is a heading, heads every segment after it until
  the next heading.
- postings: which windows hold each term (the question-term coverage of every window at once).
- per segment: the years / quarters / states it names (the cross-check), whether it states an amount,
  a date or duration, a company, the agreement's own date ("entered into as of ..."), and whether it is a
  heading, a fragment or a table-of-contents line (those rank after every full sentence).

Pure Python + numpy, no embeddings: qa.py scores every segment with these before it embeds any.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from pipeline.tasks.retrieval import Bm25, terms

MIN_ANSWER_WORDS = 7  # shorter segments (headings, fragments) rank after every full sentence
HEADING_WORDS = 12  # dropped text longer than this between two segments is not a heading
TITLE_RUNS = 2  # a title heads its section and may head its table-of-contents line; a running header heads every page
DATED_FIRST = 4  # the document's own date ("dated as of") is among its first dated segments

# Patterns of lowercased text (case-insensitive matching costs twice as much over a document's segments)
_MONTH = r"(jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?"
_NUMBER_WORD = r"one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|fifteen|twenty|thirty"
AMOUNT = re.compile(r"\$\s?\d|\d[\d,.]*\s?(%|percent|million|billion|thousand|days|months|years)|\d{1,3}(,\d{3})+")
DATE = re.compile(rf"\b{_MONTH}\s+\d{{1,2}}(st|nd|rd|th)?,?\s+\d{{4}}|\b\d{{1,2}}(st|nd|rd|th)?\s+(day\s+of\s+)?"
                  rf"{_MONTH},?\s+\d{{4}}|\b\d{{1,2}}/\d{{1,2}}/\d{{2,4}}\b"
                  rf"|\b(\d+|{_NUMBER_WORD})\s*(\(\d+\)\s*)?(year|month)s?\b")
MONEY = re.compile(r"\$\s?\d|\d\s?(million|billion|thousand)|\b\d{1,3}(,\d{3})+\b")
CALENDAR_DATE = re.compile(rf"\b{_MONTH}\s+\d{{1,2}}(st|nd|rd|th)?,?\s+\d{{4}}|\b\d{{1,2}}(st|nd|rd|th)?\s+"
                           rf"(day\s+of\s+)?{_MONTH},?\s+\d{{4}}")
DATED_AS_OF = re.compile(r"\b(dated|entered into|made|effective|executed)\b[^.;]{0,40}?\b(as of|on|this)\b[^.;]{0,12}?("
                         + CALENDAR_DATE.pattern + ")")
# a company's legal form, abbreviated, names a party ("Nuance Communications, Inc.", "Dialog Semiconductor (UK)
# Ltd."); "a corporation duly organized" and "not limited to" name no one
ORGANIZATION = re.compile(r"\b(inc|ltd|llc|l\.l\.c|corp|plc|gmbh|l\.p|n\.v|s\.a)\b\.?")
YEAR = re.compile(r"\b(?:19|20)\d\d\b")
QUARTER = re.compile(r"\b(?:q[1-4]|first|second|third|fourth) quarter\b|\bq[1-4]\b")
_STATES = ("alabama|alaska|arizona|arkansas|california|colorado|connecticut|delaware|florida|georgia|hawaii|"
           "idaho|illinois|indiana|iowa|kansas|kentucky|louisiana|maine|maryland|massachusetts|michigan|"
           "minnesota|mississippi|missouri|montana|nebraska|nevada|ohio|oklahoma|oregon|pennsylvania|"
           "tennessee|texas|utah|vermont|virginia|washington|wisconsin|wyoming")
STATE = re.compile(r"\b(?:new york|new jersey|new hampshire|new mexico|north carolina|north dakota|south carolina|"
                   r"south dakota|rhode island|west virginia|england|" + _STATES + r")\b")
NAMED = {"year": YEAR, "quarter": QUARTER, "state": STATE}  # kinds of name/number a question can pin
# (no capturing groups in these: findall then returns whole matches)
_SECTION_NUMBER = re.compile(r"(?<![\d.,$])\b\d{1,2}\.\d{1,2}\b(?![\d,%])")
_LEADING_NUMBER = re.compile(r"^\s*(section\s+|article\s+)?[\dA-Za-z]{0,2}(\.\d+)*\.?\s", re.I)
_DIGIT = re.compile(r"\d")
_WORD = re.compile(r"[^\W\d_]{3,}")


@dataclass
class QaFacts:
    windows: Bm25  # [S] segment + neighbours + section heading
    postings: dict[str, np.ndarray]  # window term -> indices of the windows holding it
    short: np.ndarray  # [S] bool: heading, fragment or contents line
    money: np.ndarray  # [S] bool: states an amount of money or a large figure
    date: np.ndarray  # [S] bool: states a date or a duration in years/months
    organization: np.ndarray  # [S] bool: names a company by its legal form
    dated_as_of: np.ndarray  # [S] bool: "entered into as of December 18, 1998", among the first dated
    named: dict[str, list[frozenset[str]]]  # kind -> [S] what each segment names
    dated: list[int]  # segments stating a calendar date, in reading order
    titles: list[str]  # [S] the section title each segment sits under, or '' (section_titles)


def is_heading(text: str) -> bool:
    """'8.4 Confidentiality of this Agreement and its Terms.': short, mostly capitalized words (a table
    row, "Inventories 5,433 6,580", states figures: not a heading)."""
    words = [w for w in text.split() if w[:1].isalpha()]
    if len(words) > HEADING_WORDS or not words:  # first: most segments are long, and this is cheap
        return False
    if MONEY.search(text.lower()):
        return False
    return sum(w[0].isupper() for w in words if len(w) > 3) >= 0.8 * max(1, sum(len(w) > 3 for w in words))


def is_contents_line(text: str) -> bool:
    """'Grant of Rights 2.1 Grant of Rights to Distributor 2.2 Sub-distribution ... 2.5 Non-Compete':
    a table of contents names every topic and answers none; three section numbers or more, one per
    eight words at least."""
    if text.count(".") < 3:  # each section number holds a dot; the look-behind pattern is slow
        return False
    numbers = len(_SECTION_NUMBER.findall(text))
    return numbers >= 3 and numbers * 8 >= len(text.split())


def is_short(text: str, heading: bool | None = None) -> bool:
    """heading: is_heading(text) when the caller has it already."""
    # a table row ("Total net sales 82,959 97,278") is short but states a figure: not a fragment
    return ((len(text.split()) < MIN_ANSWER_WORDS and not AMOUNT.search(text.lower()))
            or (is_heading(text) if heading is None else heading) or is_contents_line(text))


def section_headings(full_text: str, spans: list[tuple[int, int]], texts: list[str],
                     heading: list[bool] | None = None) -> list[str]:
    """[S] the heading each segment sits under ('' before the first): the text dropped just before a
    segment when it holds a few words, or a segment that is itself a heading (heading: is_heading of
    each text, when the caller has it)."""
    heading = [is_heading(t) for t in texts] if heading is None else heading
    out, current, previous_end = [], "", 0
    for (start, end), text, is_head in zip(spans, texts, heading, strict=True):
        gap = " ".join(full_text[previous_end:start].split())
        if gap and len(gap.split()) <= HEADING_WORDS and _WORD.search(gap):
            current = gap
        out.append(current)
        if is_head:
            current = text
        previous_end = end
    return out


def section_titles(headings: list[str]) -> list[str]:
    """[S] the heading as a title of what the segment is about, or '': a heading in title form, without
    figures past its own number, whose first words head at most TITLE_RUNS runs of segments. A running page header
    ("NVIDIA CORPORATION AND SUBSIDIARIES NOTES TO ... (Continued)") heads a run on every page, and a
    table's column heads ("Three Months Ended April 30, 2023") or dropped cells ("Other 62 63") are not
    titles: either would make a segment mean what the page or the table is, not what it says."""
    runs: dict[str, int] = {}
    for i, heading in enumerate(headings):
        if heading and (i == 0 or headings[i - 1] != heading):
            runs[_title_key(heading)] = runs.get(_title_key(heading), 0) + 1
    titles = {h for h in set(headings) if h and runs[_title_key(h)] <= TITLE_RUNS and is_heading(h)
              and not _DIGIT.search(_LEADING_NUMBER.sub("", h))}
    return [h if h in titles else "" for h in headings]


def _title_key(heading: str) -> str:
    return " ".join(heading.lower().split()[:4])


def build(full_text: str, spans: list[tuple[int, int]], own: list[list[str]], texts: list[str]) -> QaFacts:
    """spans: the segments' (char_start, char_end) in full_text; own: their BM25 terms; texts: their text."""
    heading = [is_heading(t) for t in texts]  # once: the headings and the fragment flags both need it
    headings = section_headings(full_text, spans, texts, heading)
    heading_terms = {h: terms(h) for h in set(headings)}
    window_terms = [heading_terms[headings[i]] + [t for j in range(max(0, i - 1), min(len(own), i + 2))
                                                  for t in own[j]] for i in range(len(own))]
    postings: dict[str, list[int]] = {}
    for i, ts in enumerate(window_terms):
        for t in set(ts):
            postings.setdefault(t, []).append(i)
    windows = Bm25([f"{headings[i]} {' '.join(texts[max(0, i - 1):i + 2])}" for i in range(len(texts))],
                   corpus_terms=window_terms)
    lowered = [t.lower() for t in texts]
    # amounts, calendar dates and years all need a digit, a duration a digit or "year"/"month": the one
    # cheap scan spares the slow patterns most segments
    digit = [bool(_DIGIT.search(t)) for t in lowered]
    dateish = [d or "year" in t or "month" in t for t, d in zip(lowered, digit, strict=True)]

    def flags(pattern: re.Pattern[str], candidate: list[bool] | None = None) -> np.ndarray:
        wanted = candidate or [True] * len(lowered)
        return np.array([w and bool(pattern.search(t)) for t, w in zip(lowered, wanted, strict=True)], dtype=bool)

    dated = [i for i, (t, d) in enumerate(zip(lowered, digit, strict=True)) if d and CALENDAR_DATE.search(t)]
    dated_as_of = np.zeros(len(texts), dtype=bool)
    for i in dated[:DATED_FIRST]:  # a document states its own date before any other
        dated_as_of[i] = bool(DATED_AS_OF.search(lowered[i]))
    named = {kind: [frozenset(p.findall(t)) if kind != "year" or d else frozenset()
                    for t, d in zip(lowered, digit, strict=True)] for kind, p in NAMED.items()}
    return QaFacts(
        windows=windows, postings={t: np.array(ix) for t, ix in postings.items()},
        short=np.array([is_short(t, h) for t, h in zip(texts, heading, strict=True)], dtype=bool),
        money=flags(MONEY, digit), date=flags(DATE, dateish), organization=flags(ORGANIZATION),
        dated_as_of=dated_as_of, named=named, dated=dated, titles=section_titles(headings))
