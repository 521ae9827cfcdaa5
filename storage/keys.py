"""API keys: a high-entropy secret shown once; only its sha256 is stored.

A fast hash is enough here (unlike passwords): the secret has 256 bits of entropy, so there is
nothing to brute-force, and lookups stay one indexed equality query per request.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage.models import ApiKey, utcnow

SECRET_PREFIX = "ld_"
# Postgres NOTIFY channel carrying the hash of each revoked key (api/key_cache.py listens on it).
REVOKED_CHANNEL = "longdoc_key_revoked"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def create_key(session: Session, name: str) -> tuple[ApiKey, str]:
    """Insert a new key (flushed, not committed); returns (row, secret). The secret is not stored."""
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(name=name, key_hash=hash_secret(secret), prefix=secret[:10])
    session.add(key)
    session.flush()
    return key, secret


def authenticate(session: Session, secret: str) -> ApiKey | None:
    """The active key for this secret, or None (unknown or revoked)."""
    if not secret:
        return None
    key = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_secret(secret))).one_or_none()
    if key is None or key.revoked_at is not None:
        return None
    return key


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)))


def revoke_key(session: Session, key_id: uuid.UUID) -> ApiKey | None:
    """Mark the key revoked (idempotent); None if no such key. On Postgres, every API process is told
    when the transaction commits (a NOTIFY is transactional), so their key caches drop it at once."""
    key = session.get(ApiKey, key_id)
    if key is not None and key.revoked_at is None:
        key.revoked_at = utcnow()
    if key is not None and session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_notify(REVOKED_CHANNEL, key.key_hash)))
    return key
