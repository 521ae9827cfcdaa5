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
            sha256 = digest.hexdigest()
            final = self.path(sha256)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(tmp_name, 0o644)
            # Same content, same name: replacing an existing blob is harmless and keeps this atomic.
            os.replace(tmp_name, final)
            return sha256, size, final
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise

    def delete(self, sha256: str) -> bool:
        """Remove the blob; True if it existed. Empty fan-out directories are left (cheap, reused)."""
        try:
            self.path(sha256).unlink()
        except FileNotFoundError:
            return False
        log.info("deleted blob %s", sha256)
        return True
