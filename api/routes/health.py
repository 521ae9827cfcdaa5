"""Liveness, readiness and Prometheus metrics (no auth: these are for the platform, not tenants)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api.deps import SettingsDep
from api.errors import error_response
from storage.db import get_sessionmaker
from workers.transport import get_dispatcher

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (says nothing about the DB or broker)."""
    return {"status": "ok"}


def _database_ok(url: str) -> bool:
    try:
        with get_sessionmaker(url)() as session:
            session.execute(text("SELECT 1"))
        return True
    except Exception as exc:
        log.warning("readyz: database check failed: %s", exc.__class__.__name__)
        return False


@router.get("/readyz", responses={503: {"description": "database or broker unreachable"}})
def readyz(settings: SettingsDep) -> Response:
    """200 when the database and the broker answer, else 503 naming what is down."""
    checks = {"database": _database_ok(settings.effective_database_url), "broker": get_dispatcher(settings).broker_ok()}
    down = [name for name, ok in checks.items() if not ok]
    if down:
        return error_response(503, "not_ready", f"unreachable: {', '.join(down)}", {"Retry-After": "5"})
    return Response('{"status":"ok","database":"ok","broker":"ok"}', media_type="application/json")


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
