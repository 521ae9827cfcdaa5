"""Every error leaves the API as JSON {"error": {"code", "message"}}; never a stack trace.

Routes raise ApiError with a stable code. Framework errors (404 route, 405 with an Allow header that
names every method the path serves, a body that is not JSON (400), validation (422)), an
unreachable database or broker (503) and anything unexpected (500, logged here with its traceback)
are mapped to the same shape.
"""

from __future__ import annotations

import logging

import kombu.exceptions
import psycopg
import redis.exceptions
import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

_CODE_BY_STATUS = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                   405: "method_not_allowed", 409: "conflict", 413: "too_large", 415: "unsupported_media_type",
                   422: "validation_error", 503: "unavailable"}

# Connection-level failures: the request may succeed later, so they answer 503, not 500.
# psycopg.OperationalError (PoolTimeout included): the job poll's reads use psycopg directly.
DB_DOWN = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.TimeoutError,
           psycopg.OperationalError)
BROKER_DOWN = (kombu.exceptions.OperationalError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


class BodyTooLarge(StarletteHTTPException):
    """Raised from the limited receive(); an HTTPException so FastAPI's body parsing re-raises it."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds {limit} bytes")


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


# Allow lists methods in this order (FastAPI routes serve no HEAD for a GET).
_METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(request: Request) -> str:
    """Every method some route serves on this path. Starlette's 405 names only the methods of the
    first route whose path matched (`/v1/documents` said POST, not GET, POST), but a path is often
    served by several routes, one per method."""
    # Asked per method (a route, or a router of them, matches FULL when it serves that method here):
    # FastAPI's included routers do not expose their routes' methods directly.
    routes = request.app.router.routes
    return ", ".join(method for method in _METHOD_ORDER
                     if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes))


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header"))
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _CODE_BY_STATUS.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": allowed_methods(request)}
        return error_response(exc.status_code, code, message, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # A body that is not JSON at all is a malformed request (400), not a rule it broke (422).
        if any(err.get("type") == "json_invalid" for err in exc.errors()):
            return error_response(400, "invalid_json", f"the request body is not valid JSON: {_validation_message(exc)}")
        return error_response(422, "validation_error", _validation_message(exc))

    async def _db_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc.__class__.__name__)
        return error_response(503, "database_unavailable", "the database is unreachable; retry later",
                              {"Retry-After": "5"})

    async def _broker_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("broker unavailable on %s %s: %s", request.method, request.url.path, exc)
        return error_response(503, "broker_unavailable",
                              "the task broker is unreachable; what was stored is kept and is queued "
                              "again by the reconciler; retrying an upload with the same Idempotency-Key is safe", {"Retry-After": "5"})

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # Nobody is left to read this; answering keeps the log free of a bogus 500 trace.
        log.info("client disconnected during %s %s", request.method, request.url.path)
        return error_response(400, "client_disconnected", "the client closed the connection mid-request")

    for exc_class in DB_DOWN:
        app.add_exception_handler(exc_class, _db_down)
    for exc_class in BROKER_DOWN:
        app.add_exception_handler(exc_class, _broker_down)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal error; see the server log")


class BodyLimitMiddleware:
    """Caps request bodies before they are spooled to disk: the upload route gets upload_limit bytes,
    every other route default_limit. A declared Content-Length over the limit is refused unread."""

    def __init__(self, app: ASGIApp, *, upload_path: str, upload_limit: int, default_limit: int) -> None:
        self.app, self.upload_path = app, upload_path
        self.upload_limit, self.default_limit = upload_limit, default_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.upload_limit if scope["path"].rstrip("/") == self.upload_path else self.default_limit
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            response = error_response(413, "too_large", f"request body of {declared} bytes exceeds {limit} bytes")
            return await response(scope, receive, send)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:  # raised outside a route (no handler ran): answer here
            if started:
                raise
            await error_response(413, "too_large", str(exc.detail))(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None

