"""HTTP calls to a running longdoc service, polite under load.

429 and 503 (and 502/504, connection failures) are retried after the server's Retry-After (seconds
or an HTTP date) or, without one, an exponential backoff with jitter, until `max_wait_s` has passed
for that call; a 429 pauses every thread of the batch, since the limit is the client's, not the
call's. Every wait ends early when the batch is asked to stop (Stopped). Error bodies are the
service's {"error": {"code", "message"}}.
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

log = logging.getLogger(__name__)
# httpx logs every request at INFO: a batch makes thousands; its own lines say what matters.
logging.getLogger("httpx").setLevel(logging.WARNING)

RETRY_STATUSES = {429, 502, 503, 504}
MAX_RETRY_AFTER_S = 300.0


class ApiError(Exception):
    def __init__(self, status: int | None, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.status, self.code, self.message, self.retryable = status, code, message, retryable


class Stopped(Exception):
    """The batch was asked to stop while this call waited."""


def retry_after_s(value: str | None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(max(0.0, when.timestamp() - time.time()), MAX_RETRY_AFTER_S)


def backoff_s(attempt: int) -> float:
    """0.5, 1, 2, 4 ... 30 s, +-25% jitter so that threads do not come back in step."""
    return min(30.0, 0.5 * 2 ** attempt) * random.uniform(0.75, 1.25)


def error_of(response: httpx.Response) -> tuple[str, str]:
    try:
        error = response.json()["error"]
        return str(error["code"]), str(error.get("message", ""))
    except (ValueError, KeyError, TypeError):
        return f"http_{response.status_code}", response.text[:200]


class ApiClient:
    def __init__(self, base_url: str, api_key: str, *, stop: threading.Event, max_wait_s: float = 600.0,
                 timeout_s: float = 120.0, transport: httpx.BaseTransport | None = None) -> None:
        self.http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s, transport=transport,
                                 headers={"Authorization": f"Bearer {api_key}", "User-Agent": "longdoc-batch"})
        self.stop, self.max_wait_s = stop, max_wait_s
        self._paused_until = 0.0  # a 429 holds every thread until then
        self._lock = threading.Lock()
        self.retries = 0  # calls repeated after a 429/503/transport error (tests, summary)

    def _sleep(self, seconds: float) -> None:
        if self.stop.wait(max(0.0, seconds)):
            raise Stopped

    def request(self, method: str, url: str, *, body: Callable[[contextlib.ExitStack], dict[str, Any]] | None = None,
                **kwargs: Any) -> httpx.Response:
        """One call, repeated on 429/503/502/504 and transport errors; `body(stack)` rebuilds request
        arguments that a retry cannot reuse (an open file, entered into the stack)."""
        deadline = time.monotonic() + self.max_wait_s
        attempt = 0
        while True:
            if self.stop.is_set():
                raise Stopped
            self._sleep(self._paused_until - time.monotonic())
            try:
                with contextlib.ExitStack() as stack:  # what body() opened closes after each attempt
                    extra = body(stack) if body else {}
                    response = self.http.request(method, url, **kwargs, **extra)
                wait = None
                if response.status_code not in RETRY_STATUSES:
                    return response
                wait = retry_after_s(response.headers.get("Retry-After"))
                why = f"{response.status_code} {error_of(response)[0]}"
            except httpx.TransportError as exc:
                response, wait, why = None, None, f"{type(exc).__name__}: {exc}"
            wait = backoff_s(attempt) if wait is None else wait
            if response is not None and response.status_code == 429:
                with self._lock:
                    self._paused_until = max(self._paused_until, time.monotonic() + wait)
            if time.monotonic() + wait > deadline:
                raise ApiError(response.status_code if response is not None else None, "api_unavailable",
                               f"{method} {url}: the service did not answer in {self.max_wait_s:.0f} s ({why})",
                               retryable=True)
            log.info("%s %s: %s; retrying in %.1f s", method, url, why, wait)
            self.retries += 1
            attempt += 1
            self._sleep(wait)

    def json(self, method: str, url: str, *, ok: tuple[int, ...] = (200,), **kwargs: Any) -> tuple[dict, httpx.Response]:
        response = self.request(method, url, **kwargs)
        if response.status_code not in ok:
            code, message = error_of(response)
            raise ApiError(response.status_code, code, message, retryable=response.status_code >= 500)
        return response.json(), response

    def close(self) -> None:
        self.http.close()
