"""Service commands: `longdoc serve` (HTTP API) and `longdoc worker -Q parse|gpu` (Celery worker).

Heavy imports (uvicorn, the app, Celery) happen inside the command functions.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from config.settings import Settings

log = logging.getLogger(__name__)

QUEUES = ("parse", "gpu")


def register(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run the HTTP API (and, in embedded mode, the in-process workers)")
    serve.add_argument("--host", default=None, help="bind address (default: settings.api_host)")
    serve.add_argument("--port", type=int, default=None, help="port (default: settings.api_port)")
    serve.add_argument("--workers", type=int, default=None,
                       help="API processes sharing the port (default: settings.api_workers); service mode only")
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="run a Celery worker for the parse (CPU) or gpu queue")
    worker.add_argument("-Q", "--queues", required=True, type=_queues,
                        help="parse, gpu, or a comma list (e.g. parse,gpu for a single-box worker)")
    worker.add_argument("-c", "--concurrency", type=int, default=None,
                        help="parallel tasks (parse only; default: CPU count). gpu always runs one at a time")
    worker.add_argument("--pool", choices=("threads", "prefork", "solo"), default=None,
                        help="override the pool (default: threads; gpu queue: gpu_documents_in_flight threads)")
    worker.add_argument("--beat", action="store_true",
                        help="also run the reaper schedule (celery beat) in this worker; run exactly one per deployment")
    worker.set_defaults(func=cmd_worker)


def _queues(value: str) -> list[str]:
    queues = [q.strip() for q in value.split(",") if q.strip()]
    bad = [q for q in queues if q not in QUEUES]
    if not queues or bad:
        raise argparse.ArgumentTypeError(f"unknown queue(s) {bad or value!r}; choose from {', '.join(QUEUES)}")
    return queues


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from config.settings import get_settings

    settings = get_settings()
    workers = args.workers if args.workers is not None else settings.api_workers
    host, port = args.host or settings.api_host, args.port or settings.api_port
    level = logging.getLevelName(logging.getLogger().level)
    if workers < 1:
        print(f"--workers must be at least 1, got {workers}", file=sys.stderr)
        return 2
    if workers > 1:
        if settings.embedded or settings.effective_database_url.startswith("sqlite"):
            print(f"--workers {workers} needs service mode (LONGDOC_BROKER_URL and a Postgres LONGDOC_DATABASE_URL): "
                  "in embedded mode the task pool and the SQLite database live inside the one API process; "
                  "run `longdoc serve` with one worker", file=sys.stderr)
            return 2
        from api.serve import serve_workers

        return serve_workers(workers, host, port, level.lower(), _worker_log_config(level))
    # The app migrates the embedded SQLite default itself and refuses an unmigrated service database.
    from api.app import create_app

    runner = None
    if settings.embedded:
        from workers.embedded import get_runner

        runner = get_runner(settings)
        runner.start_reaper()
        _preload_engine(settings)  # as a gpu worker does: the first job must not pay the engine load
        log.info("embedded mode: tasks run in-process (%d parse threads, %d gpu threads)",
                 settings.embedded_workers, settings.gpu_documents_in_flight)
    try:
        uvicorn.run(create_app(settings), host=host, port=port, log_level=level.lower())
    finally:
        if runner is not None:
            runner.shutdown(wait=False)
    return 0


def _worker_log_config(level: str) -> dict:
    """uvicorn's logging config plus our root logger: worker processes are spawned fresh, so the CLI's
    logging.basicConfig does not reach them."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["longdoc"] = {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    config["handlers"]["longdoc"] = {"class": "logging.StreamHandler", "formatter": "longdoc",
                                     "stream": "ext://sys.stderr"}
    config["root"] = {"handlers": ["longdoc"], "level": level}
    return config


def cmd_worker(args: argparse.Namespace) -> int:
    from config.settings import get_settings
    from storage import migrate
    from workers.tasks import worker_app

    settings = get_settings()
    if settings.embedded:
        print("longdoc worker needs LONGDOC_BROKER_URL (Redis) and LONGDOC_DATABASE_URL; "
              "without them `longdoc serve` runs tasks in-process", file=sys.stderr)
        return 2
    try:
        migrate.assert_up_to_date(settings.effective_database_url)
    except migrate.DatabaseNotMigrated as exc:
        print(str(exc), file=sys.stderr)
        return 2
    from workers.names import REAP_QUEUE

    # gpu: a threads pool of gpu_documents_in_flight threads, each running one document's jobs against
    # the one engine of the process (its requests join the engine's continuous batch)
    pool = args.pool or "threads"
    default_concurrency = settings.gpu_documents_in_flight if "gpu" in args.queues else (os.cpu_count() or 1)
    concurrency = 1 if pool == "solo" else (args.concurrency or default_concurrency)
    name = "-".join(args.queues)
    # The beat worker also consumes the reaper's own queue, so ticks never wait behind a backlog.
    queues = [*args.queues, REAP_QUEUE] if args.beat else list(args.queues)
    argv = ["worker", "--queues", ",".join(queues), "--pool", pool, "--concurrency", str(concurrency),
            "--hostname", f"longdoc-{name}-{os.getpid()}@%h",
            "--loglevel", logging.getLevelName(logging.getLogger().level),
            "--without-gossip", "--without-mingle"]
    if args.beat:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        argv += ["--beat", "--schedule", str(settings.data_dir / "celerybeat-schedule")]
    log.info("starting celery %s", " ".join(argv))
    if "gpu" in args.queues and pool in ("solo", "threads"):
        from workers.engine_metrics import start_engine_metrics

        metrics = start_engine_metrics(settings)  # this process's engine counters; None when the port is 0
        _preload_engine(settings, on_loaded=metrics.attach if metrics is not None else None)
    worker_app(settings).worker_main(argv)
    return 0


def _preload_engine(settings: Settings, on_loaded: Callable[[Any], None] | None = None) -> None:
    """Load the engine in the background while the worker connects, so the first job does not pay for it
    (a job arriving earlier waits on the same load). A load error is logged; each job then fails with it."""
    import threading

    from workers.document_jobs import task_engine

    def load() -> None:
        try:
            engine = task_engine(settings)
            if on_loaded is not None:
                on_loaded(engine)
        except Exception as exc:
            log.error("engine %s failed to load at startup: %s", settings.engine, exc)

    threading.Thread(target=load, name="engine-preload", daemon=True).start()
