"""Bytes -> pages: media-type sniffing, PDF/text/HTML/DOCX extraction, cleaning, containment.

Public interface:
- sniff_media_type(head) -> media type or None (sniff.py)
- ParseLimits(max_pages, timeout_s, memory_mb, max_bytes=None) (extract.py)
- parse_file(path, *, password=None, extractor="pdfium", limits) -> ParsedDocument: runs the parse
  in a killable child process (supervisor.py, child.py); raises PipelineError for every bad input.

Modules: sniff (media type), pdf (PDFium + pypdf), textlike (text/Markdown/HTML/DOCX), extract (one
document in this process: guards, dispatch, clean), child + supervisor (containment).
"""

from pipeline.parse.extract import ParseLimits
from pipeline.parse.sniff import sniff_media_type
from pipeline.parse.supervisor import ParserPool, parse_file

__all__ = ["ParseLimits", "ParserPool", "parse_file", "sniff_media_type"]
