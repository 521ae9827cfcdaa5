"""Content-addressed store for raw uploads: root/ab/cd/<sha256>.

Writes stream through a temp file in the same filesystem (hashing while writing), then move into
place with an atomic rename, so a reader never sees a partial blob and memory stays flat in the
file size.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class TooLarge(Exception):
    """The stream is longer than the allowed maximum; nothing was stored."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"upload exceeds the limit of {max_bytes} bytes")
        self.max_bytes = max_bytes


@dataclass(frozen=True)
class StagedBlob:
    """An upload hashed into a temp file of the store, waiting for BlobStore.place."""

    sha256: str
    size: int
    tmp_path: Path


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._tmp = self.root / "tmp"

    def path(self, sha256: str) -> Path:
        if not _SHA256.match(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put_stream(self, fileobj: BinaryIO, max_bytes: int) -> tuple[str, int, Path]:
        """Copy fileobj (from its current position) into the store; returns (sha256, size, path).

        Raises TooLarge as soon as more than max_bytes have been read; the temp file is removed.
        """
        staged = self.stage(fileobj, max_bytes)
        self.place(staged)
        return staged.sha256, staged.size, self.path(staged.sha256)

    def stage(self, fileobj: BinaryIO, max_bytes: int) -> StagedBlob:
        """Stream fileobj into a temp file of the store (hashed, fsynced), not yet under its name.

        The upload path stages first, then places the blob under the content lock just before its
        rows commit, so an upload whose transaction fails before that leaves nothing behind.
        Raises TooLarge as soon as more than max_bytes have been read; the temp file is removed.
        """
        self._tmp.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="upload-")
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := fileobj.read(CHUNK_BYTES):
                    size += len(chunk)
                    if size > max_bytes:
                        raise TooLarge(max_bytes)
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp_name, 0o644)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        return StagedBlob(digest.hexdigest(), size, Path(tmp_name))

    def place(self, staged: StagedBlob) -> bool:
        """Move a staged file to its name unless the blob is already there (then it is only dropped).

        True when this call created the blob: the caller then owns removing it if its rows do not commit.
        """
        final = self.path(staged.sha256)
        if final.is_file():
            self.discard(staged)
            return False
        final.parent.mkdir(parents=True, exist_ok=True)
        # Same content, same name: were another upload to place it at the same moment, either copy is right.
        os.replace(staged.tmp_path, final)
        return True

    def discard(self, staged: StagedBlob) -> None:
        """Remove the staged temp file if it was not placed (idempotent)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staged.tmp_path)

    def delete(self, sha256: str) -> bool:
        """Remove the blob; True if it existed. Empty fan-out directories are left (cheap, reused)."""
        try:
            self.path(sha256).unlink()
        except FileNotFoundError:
            return False
        log.info("deleted blob %s", sha256)
        return True
