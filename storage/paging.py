"""What the API's list queries share: owner scoping and keyset pagination over (created_at, id).

owner_id is the API key's id, or None when auth is off (then only rows created without a key are
visible).
"""

from __future__ import annotations

import base64
import binascii
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import ColumnElement, and_, or_
from sqlalchemy.orm import Session

from storage.models import Document, Job

T = TypeVar("T")


class InvalidCursor(ValueError):
    """A pagination cursor that this server did not issue."""


@dataclass(frozen=True)
class Cursor:
    """Position after the last row of a page, in (created_at DESC, id DESC) order."""

    created_at: datetime
    id: uuid.UUID

    def encode(self) -> str:
        raw = f"{self.created_at.isoformat()}|{self.id.hex}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
            created, ident = raw.split("|")
            return cls(datetime.fromisoformat(created), uuid.UUID(hex=ident))
        except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
            raise InvalidCursor(f"invalid cursor {token!r}") from exc


@dataclass
class ResultPage(Generic[T]):  # noqa: UP046 (PEP 695 syntax needs Python 3.12; we support 3.11)
    items: list[T]
    next_cursor: str | None


def owned(model: type[Document] | type[Job], owner_id: uuid.UUID | None) -> ColumnElement[bool]:
    return model.owner_id.is_(None) if owner_id is None else model.owner_id == owner_id


def paginate(session: Session, stmt: Any, model: type[Document] | type[Job], limit: int,
             cursor: str | None) -> ResultPage:
    if cursor:
        at = Cursor.decode(cursor)
        stmt = stmt.where(or_(model.created_at < at.created_at,
                              and_(model.created_at == at.created_at, model.id < at.id)))
    rows = list(session.scalars(stmt.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)).unique())
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = Cursor(rows[-1].created_at, rows[-1].id).encode() if more else None
    return ResultPage(rows, next_cursor)
