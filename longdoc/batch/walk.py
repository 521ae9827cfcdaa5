"""The folder walk and the scan of each file: size, sha256 and media type (from the bytes).

Directory symlinks are not followed (a link back up the tree would loop); file symlinks are read.
A pattern matches a file's path relative to DIR (`*` spans directories, as in fnmatch) or its name;
an --exclude pattern that matches a directory prunes it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline.parse import sniff_media_type

READ_BYTES = 1 << 20
SNIFF_BYTES = 8192


@dataclass(frozen=True)
class ScannedFile:
    rel: str  # path relative to DIR, POSIX separators: the file's name in every output
    path: Path
    size: int
    sha256: str | None  # None when the file could not be read
    media_type: str | None  # None: empty, unreadable or not a supported type
    error: tuple[str, str] | None = None  # (code, message) known before any parse


def _matches(rel: str, patterns: Iterable[str]) -> bool:
    name = PurePosixPath(rel).name
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def walk(root: Path, *, include: list[str] | None = None, exclude: list[str] | None = None,
         skip: set[Path] | None = None) -> Iterator[tuple[str, Path]]:
    """(relative path, path) of every file under root, sorted, filtered by the patterns; `skip` holds
    resolved paths never to yield (the batch's own output files when they sit inside root)."""
    include, exclude, skip = include or [], exclude or [], skip or set()
    for top, dirs, files in os.walk(root, followlinks=False):
        rel_top = Path(top).relative_to(root).as_posix()
        prefix = "" if rel_top == "." else rel_top + "/"
        dirs[:] = sorted(d for d in dirs if not _matches(prefix + d, exclude))
        for name in sorted(files):
            rel, path = prefix + name, Path(top) / name
            if include and not _matches(rel, include):
                continue
            if _matches(rel, exclude) or path.resolve() in skip:
                continue
            yield rel, path


def scan_file(rel: str, path: Path) -> ScannedFile:
    """Hash the whole file and sniff its head, in one read."""
    digest, head, size = hashlib.sha256(), b"", 0
    try:
        with path.open("rb") as f:
            while chunk := f.read(READ_BYTES):
                if size < SNIFF_BYTES:
                    head += chunk[:SNIFF_BYTES - size]
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        return ScannedFile(rel, path, 0, None, None, ("unreadable", f"cannot read the file: {exc.strerror or exc}"))
    sha256 = digest.hexdigest()
    if size == 0:
        return ScannedFile(rel, path, 0, sha256, None, ("empty_file", "the file is empty"))
    media_type = sniff_media_type(head)
    if media_type is None:
        return ScannedFile(rel, path, size, sha256, None, (
            "unsupported_media_type", "unsupported file type (detected from its bytes): "
            "longdoc reads PDF, text, Markdown, HTML and DOCX"))
    return ScannedFile(rel, path, size, sha256, media_type)


def scan(entries: Iterable[tuple[str, Path]], threads: int = 4) -> Iterator[ScannedFile]:
    """scan_file over the entries, in their order; hashlib releases the GIL on large reads, so a few
    threads keep a disk busy."""
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="longdoc-scan") as pool:
        yield from pool.map(lambda entry: scan_file(*entry), entries)
