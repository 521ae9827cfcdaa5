"""PDF passwords at rest: encrypted under the deployment's key until the parse that needs them ends.

Whichever parse worker claims a document needs its password, possibly long after the upload (a
re-send by the reaper or the reconciler, a retry after a transient error), so it cannot travel only
in the broker message: Redis keeps messages in plain text, and a re-sent message would lack it. It
is kept in `documents.encrypted_password` as a Fernet token (cryptography's authenticated recipe:
AES-128-CBC + HMAC-SHA256) and erased by the write that ends the parse, parsed or failed.

The key is settings.secret_key (LONGDOC_SECRET_KEY). Without one, embedded mode (one machine, one
data dir) creates `data_dir/secret.key` (mode 0600) on first use and reads it afterwards; service
mode has no way to share a generated key between the API and its workers, so the API refuses an
upload with a password (SecretKeyMissing -> 400 `secret_key_missing`), and a parse worker that
cannot decrypt a stored password (no key, or another key than the API's) fails the document
`password_unreadable`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from config.settings import Settings

KEY_FILE = "secret.key"
# The document's error code when a worker cannot decrypt its stored password; a re-upload with the
# password parses it again (as after password_required / wrong_password).
PASSWORD_UNREADABLE = "password_unreadable"


class SecretKeyMissing(Exception):
    """Service mode without settings.secret_key: passwords cannot be stored."""


class PasswordUnreadable(Exception):
    """A stored password that this process cannot decrypt (no key, or not the key it was stored with)."""


def can_store_passwords(settings: Settings) -> bool:
    return settings.secret_key is not None or settings.embedded


def encrypt_password(settings: Settings, password: str) -> str:
    """The token to store in the documents row. Raises SecretKeyMissing (service mode, no key)."""
    return _fernet(settings, create=True).encrypt(password.encode("utf-8")).decode("ascii")


def decrypt_password(settings: Settings, token: str) -> str:
    """The password a token stored by encrypt_password holds. Raises PasswordUnreadable."""
    try:
        return _fernet(settings, create=False).decrypt(token.encode("ascii")).decode("utf-8")
    except (SecretKeyMissing, InvalidToken, ValueError) as exc:
        raise PasswordUnreadable(
            "the stored password cannot be decrypted here (LONGDOC_SECRET_KEY unset, or not the key the API "
            "stored it with); upload the file again with its password") from exc


def _fernet(settings: Settings, *, create: bool) -> Fernet:
    if settings.secret_key is not None:
        return Fernet(settings.secret_key.get_secret_value().encode("ascii"))
    if not settings.embedded:
        raise SecretKeyMissing("this service has no LONGDOC_SECRET_KEY, so it cannot keep a password until the "
                               "parse; upload without one, or ask the operator to set the key")
    return Fernet(_key_file(Path(settings.data_dir) / KEY_FILE, create=create))


def _key_file(path: Path, *, create: bool) -> bytes:
    """The embedded key file's key; created (0600, atomically: two first uploads agree) when asked."""
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        if not create:
            raise SecretKeyMissing(f"no key file at {path}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".secret-")  # mkstemp files are 0600
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(Fernet.generate_key())
            out.flush()
            os.fsync(out.fileno())
        with contextlib.suppress(FileExistsError):  # another thread or process made it first: use theirs
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
    return path.read_bytes().strip()
