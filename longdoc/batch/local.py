"""One file in this process: the contained parse, chunking with the engine's tokenizer, the tasks.

The same steps a parse worker and a gpu worker take (workers/bodies.py), without a database: the
parse runs in pipeline.parse's killable child process, the tasks through pipeline.tasks.run_task.
Per-file failures become the record's error; configuration failures (no tokenizer, no parser, an
engine that cannot load) raise, because every other file would fail the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from config.settings import Settings
from longdoc.batch.passwords import PASSWORD_CODES
from longdoc.batch.records import Record, fail
from longdoc.batch.request import TaskRequest
from pipeline.types import DocumentText, ParsedDocument, PipelineError

log = logging.getLogger(__name__)

TaskProgress = Callable[[str, float, str], None]  # (task, fraction, stage)


def chunk_tokenizer(settings: Settings):  # noqa: ANN201 (pipeline.tokens.TokenCounter)
    """The tokenizer the chunker uses for documents the configured engine reads (decided without
    loading the engine, as a parse worker decides it). Raises TokenizerNotFound (LookupError)."""
    from pipeline.tasks import tokenizer_spec
    from pipeline.tokens import load_tokenizer

    return load_tokenizer(tokenizer_spec(settings.engine, model=settings.model,
                                         embedding_model=settings.embedding_model))


def parse_and_chunk(path: Path, settings: Settings, passwords: list[str]) -> tuple[ParsedDocument, DocumentText]:
    """Parse `path` (without a password, then with each candidate while the PDF refuses) and chunk it.
    Raises PipelineError for a bad file."""
    from pipeline.chunk import build_document_text
    from pipeline.parse import ParseLimits, parse_file

    limits = ParseLimits(max_pages=settings.max_pages, timeout_s=settings.parse_timeout_s,
                         memory_mb=settings.parse_memory_mb, max_bytes=settings.max_upload_bytes)
    attempts: list[str | None] = [None, *passwords]
    for i, password in enumerate(attempts):
        try:
            parsed = parse_file(path, password=password, extractor=settings.pdf_extractor, limits=limits)
            break
        except PipelineError as exc:
            if exc.code not in PASSWORD_CODES or i == len(attempts) - 1:
                if exc.code in PASSWORD_CODES and passwords:
                    raise PipelineError("wrong_password", f"none of the {len(passwords)} password(s) from "
                                        "--password-file that apply to this file opens it") from None
                if exc.code == "password_required":
                    raise PipelineError(exc.code, "the PDF is encrypted; give its password with "
                                        "--password-file") from None
                raise
    text = build_document_text(parsed.pages, tokenizer=chunk_tokenizer(settings),
                               chunk_tokens=settings.chunk_tokens, overlap_tokens=settings.chunk_overlap_tokens)
    if not text.full_text.strip():
        raise PipelineError("no_text_layer", f"no page of {len(parsed.pages)} has extractable text "
                            f"({parsed.needs_ocr_pages} need OCR)")
    return parsed, text


def parse_into(record: Record, path: Path, settings: Settings, passwords: list[str]) -> DocumentText | None:
    """parse_and_chunk, its outcome written into the record; the document, or None when it failed."""
    started = time.perf_counter()
    try:
        parsed, text = parse_and_chunk(path, settings, passwords)
    except PipelineError as exc:
        fail(record, exc.code, exc.message)
        return None
    finally:
        record["timings"]["parse_s"] = round(time.perf_counter() - started, 3)
    record.update(media_type=parsed.media_type, pages=len(parsed.pages), tokens=text.token_count)
    if parsed.warnings:
        record["warnings"] = parsed.warnings
    return text


def run_tasks(engine, request: TaskRequest, record: Record, doc: DocumentText,  # noqa: ANN001 (Engine)
              progress: TaskProgress | None = None) -> Record:
    """Every requested task on the document, in order; one task's failure is recorded and the
    others still run."""
    from pipeline.tasks import run_task

    timings = record["timings"].setdefault("tasks_s", {})
    for task, params in request.params.items():
        started = time.perf_counter()

        def report(fraction: float, stage: str, task: str = task) -> None:
            if progress is not None:
                progress(task, fraction, stage)

        try:
            record["results"][task] = run_task(engine, task, dict(params), doc, report)
        except PipelineError as exc:
            fail(record, exc.code, exc.message, task=task)
        except Exception as exc:  # a bug in one strategy must not cost the batch; the message says what
            log.debug("%s on %s failed", task, record["path"], exc_info=True)
            fail(record, "internal_error", f"{type(exc).__name__}: {exc}", task=task)
        timings[task] = round(time.perf_counter() - started, 3)
    return record


def load_engine(settings: Settings):  # noqa: ANN201 (pipeline.tasks.Engine)
    """The configured engine, once per process (pipeline.tasks caches the extractive backend).
    Raises PipelineError("model_error") when it cannot run here."""
    from pipeline.tasks import load_engine as load

    started = time.perf_counter()
    engine = load(settings.engine, model=settings.model, device=settings.device,
                  embedding_model=settings.embedding_model)
    log.info("engine %s (%s) ready in %.1f s", settings.engine, getattr(engine, "kind", "?"),
             time.perf_counter() - started)
    return engine
