"""--password-file: passwords for encrypted PDFs, kept off the command line (and out of `ps`).

One entry per line. `GLOB<TAB>PASSWORD` applies to files whose relative path or name matches GLOB;
a line without a tab is a password to try on any file. Blank lines and lines starting with `#` are
skipped; a password keeps every other character (spaces included). A file's candidates are its
matching entries first, then the general ones, each once.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

PASSWORD_CODES = {"password_required", "wrong_password"}


@dataclass(frozen=True)
class Passwords:
    specific: list[tuple[str, str]] = field(default_factory=list)  # (glob, password)
    general: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path | None) -> Passwords:
        if path is None:
            return cls()
        specific, general = [], []
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if "\t" in line:
                glob, password = line.split("\t", 1)
                specific.append((glob.strip(), password))
            else:
                general.append(line)
        return cls(specific, general)

    def candidates(self, rel: str) -> list[str]:
        name = PurePosixPath(rel).name
        found = [pw for glob, pw in self.specific
                 if fnmatch.fnmatchcase(rel, glob) or fnmatch.fnmatchcase(name, glob)]
        return list(dict.fromkeys(found + self.general))

    def __bool__(self) -> bool:
        return bool(self.specific or self.general)

    def __repr__(self) -> str:  # never print the secrets
        return f"Passwords({len(self.specific)} per-file, {len(self.general)} general)"
