"""The one interface through which work is sent: what the API, the parse body (releasing a document's
jobs) and the reaper (re-sending lost work) call after their DB commit. No torch, no transport here.

Two implementations, one chosen per process from settings by workers/transport.py get_dispatcher:
service mode's CeleryDispatcher (workers/celery_dispatch.py) sends Celery tasks *by name* to the
`parse` / `gpu` queues, so a sender never imports the task bodies; embedded mode's EmbeddedRunner
(workers/embedded.py) submits the same bodies to in-process thread pools. The bodies and the reaper
are handed the dispatcher, so they never import a transport.

Contract for callers: commit the row first, then call these. A job may be enqueued before its
document is parsed: the job body leaves it queued and the parse body releases it when parsing ends.
"""

from __future__ import annotations

from typing import Protocol
from uuid import UUID


class Dispatcher(Protocol):
    def enqueue_parse(self, document_id: UUID) -> None:
        """Parse the document (uploaded -> parsing -> parsed|failed), then release its queued jobs.

        The message carries the id only: a PDF password is stored encrypted in the row until the parse
        ends (storage/passwords.py), so a re-sent message parses as the first would.
        """

    def enqueue_job(self, job_id: UUID) -> None:
        """Run the job, and its document's other queued jobs, once the document is parsed."""

    def request_cancel(self, job_id: UUID) -> None:
        """Best effort: drop a not-yet-started message. The DB status (set by the caller) is
        authoritative; a running job notices it at its next heartbeat and stops without a result."""

    def broker_ok(self) -> bool:
        """True when the transport can take work now (the broker answers a ping within ~1 s)."""

    def queue_depths(self) -> dict[str, int]:
        """Messages waiting per queue (parse, gpu), not counting reserved ones; -1 when unknown."""
