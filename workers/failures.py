"""How a body's failures are told apart, by both transports (Celery tasks, embedded pools) and the bodies.

PipelineError -> the row fails with {code, message}; TRANSIENT_ERRORS propagate for a retry with backoff
(after the body hands its claim back); JobAborted means the claim is gone (stop, write nothing);
anything else is a bug and fails the row with INTERNAL_ERROR.
"""

from __future__ import annotations

import redis.exceptions
import sqlalchemy.exc
from kombu.exceptions import OperationalError as BrokerOperationalError

from pipeline.parse.supervisor import ParserUnavailable

# Failures that say "try again later", never "this input is bad". A parser child that cannot start is
# this machine's problem, not the document's: the document stays `uploaded` until a worker can parse it.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError, redis.exceptions.ConnectionError, BrokerOperationalError, ParserUnavailable)
MAX_TRANSIENT_RETRIES = 5
INTERNAL_ERROR = "internal_error"


def backoff_s(retries: int) -> int:
    """2, 4, 8, 16, 32 s (capped at 60) before retry number retries+1: enough for a DB failover or a
    Redis restart."""
    return min(60, 2 ** (retries + 1))


class JobAborted(Exception):
    """The claim is gone (canceled by the API, re-queued by the reaper, deleted): stop, write nothing."""
