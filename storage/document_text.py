"""A parsed document's text as rows: its pages (the page offset table) and chunks.

Written by the parse in the same transaction as its fenced status change (storage/documents.py
store_parsed_document), read back by the gpu body (load_document_text).
"""

from __future__ import annotations

import uuid

from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from pipeline.types import Chunk as PipelineChunk
from pipeline.types import DocumentText, PageSpan, ParsedDocument
from storage.models import Chunk, Document, Page


def replace_text(session: Session, document_id: uuid.UUID, parsed: ParsedDocument, text: DocumentText) -> None:
    """Replace the document's pages and chunks with these (a re-parse replaces the earlier ones)."""
    session.execute(delete(Page).where(Page.document_id == document_id))
    session.execute(delete(Chunk).where(Chunk.document_id == document_id))
    spans = {s.number: s for s in text.page_spans}
    page_rows = []
    for page in parsed.pages:
        span = spans.get(page.number)
        page_rows.append({
            "document_id": document_id, "number": page.number, "label": page.label, "text": page.text,
            "needs_ocr": page.needs_ocr,
            "char_start": span.char_start if span else 0, "char_end": span.char_end if span else 0,
        })
    if page_rows:
        session.execute(insert(Page), page_rows)
    chunk_rows = [{
        "document_id": document_id, "index": c.index, "text": c.text, "token_count": c.token_count,
        "page_start": c.page_start, "page_end": c.page_end, "char_start": c.char_start, "char_end": c.char_end,
    } for c in text.chunks]
    if chunk_rows:
        session.execute(insert(Chunk), chunk_rows)


def load_document_text(session: Session, document_id: uuid.UUID) -> DocumentText:
    """The DocumentText the parse stored: page offset table, chunks, and the full text rebuilt exactly.

    Pages hold the text at [char_start, char_end); what lies between pages (separators) is recovered
    from the chunks, which are exact slices of the full text; any gap no chunk covers is a space.
    """
    doc = session.get(Document, document_id)
    if doc is None:
        raise LookupError(f"document {document_id} not found")
    pages = session.execute(select(Page.number, Page.text, Page.char_start, Page.char_end)
                            .where(Page.document_id == document_id).order_by(Page.number)).all()
    chunk_rows = session.scalars(select(Chunk).where(Chunk.document_id == document_id).order_by(Chunk.index)).all()
    length = max([p.char_end for p in pages] + [c.char_end for c in chunk_rows] + [0])
    buf = [" "] * length
    for c in chunk_rows:
        buf[c.char_start:c.char_end] = c.text
    for p in pages:
        if p.char_end > p.char_start:
            buf[p.char_start:p.char_end] = p.text[: p.char_end - p.char_start]
    spans = [PageSpan(p.number, p.char_start, p.char_end) for p in pages]
    chunks = [PipelineChunk(index=c.index, text=c.text, token_count=c.token_count, page_start=c.page_start,
                            page_end=c.page_end, char_start=c.char_start, char_end=c.char_end) for c in chunk_rows]
    return DocumentText(full_text="".join(buf), page_spans=spans, chunks=chunks, token_count=doc.tokens or 0)
