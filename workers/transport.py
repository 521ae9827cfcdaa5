"""The process's Dispatcher, chosen from settings: embedded mode (no broker configured) runs the bodies
in this process's thread pools, service mode sends Celery tasks. The top of workers/: it alone knows
both transports."""

from __future__ import annotations

import threading

from config.settings import Settings
from workers.dispatch import Dispatcher

_celery_dispatchers: dict[str, Dispatcher] = {}
_lock = threading.Lock()


def get_dispatcher(settings: Settings) -> Dispatcher:
    """One dispatcher per process and configuration (the same object on every call)."""
    if settings.embedded:
        # Imported only here: a service-mode process (the API, a worker) never loads the embedded pools.
        from workers.embedded import get_runner

        return get_runner(settings)
    # Celery is imported only in service mode: an embedded process never loads it.
    from workers.celery_dispatch import CeleryDispatcher

    key = settings.model_dump_json()
    with _lock:
        dispatcher = _celery_dispatchers.get(key)
        if dispatcher is None:
            dispatcher = _celery_dispatchers[key] = CeleryDispatcher(settings)
        return dispatcher
