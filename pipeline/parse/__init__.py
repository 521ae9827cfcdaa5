"""Bytes -> pages: media-type sniffing, PDF/text/HTML extraction, cleaning, and the contained child process.

Public interface (see docs/architecture.md "Parsing"): sniff_media_type, ParseLimits, parse_file.
"""

from pipeline.parse.sniff import sniff_media_type

__all__ = ["sniff_media_type"]
