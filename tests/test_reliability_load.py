"""Load, bounded: 16 clients upload and poll concurrently against `longdoc serve --workers 2` (repeated
bytes, sent at the same moment by several clients, with and without Idempotency-Key): no duplicate
document, no lost upload, no 5xx. bench/api_load.py --storm runs the same scenario at full size."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from sqlalchemy import func, select

from bench.upload_storm import plan, problems, salted_files, storm
from config.settings import Settings
from storage import keys
from storage.db import session_scope
from storage.models import Document, Job
from tests.fixtures_api import SMALL_PDF
from tests.fixtures_workers import free_port, serve_process, settings_env

REPO_ROOT = Path(__file__).resolve().parents[1]
FILES, COPIES, CLIENTS = 8, 4, 16  # 32 uploads (the full run: 50 x 4 = 200)


def test_sixteen_clients_uploading_the_same_bytes_make_one_document_each(migrated_pg, api_redis_url, tmp_path,
                                                                          corpus_dir):
    port = free_port()
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", database_url=migrated_pg,
                        broker_url=api_redis_url, api_port=port, api_workers=2)
    with session_scope(migrated_pg) as s:
        key, token = keys.create_key(s, "storm")
        owner = key.id
    contents = salted_files((corpus_dir / SMALL_PDF).read_bytes(), FILES)
    with serve_process(settings_env(settings), REPO_ROOT, tmp_path / "serve.log", port,
                       "longdoc serve --workers 2") as (_server, base):
        result = asyncio.run(storm(base, token, contents, COPIES, CLIENTS))
    assert problems(result) == [], problems(result)
    assert result.statuses == {201: FILES, 200: FILES * (COPIES - 1)}
    assert set(result.poll_statuses) == {200}
    assert "Traceback" not in (tmp_path / "serve.log").read_text()
    with session_scope(migrated_pg) as s:
        assert s.scalar(select(func.count()).select_from(Document).where(Document.owner_id == owner)) == FILES
        jobs = s.scalar(select(func.count()).select_from(Job).where(Job.owner_id == owner))
    # one job per upload without a key; the keyed uploads of a file are one request (its key's job)
    queue = plan(FILES, COPIES)
    expected = sum(key is None for _, key in queue) + len({f for f, key in queue if key})
    assert jobs == len(set(result.job_ids)) == expected
    blobs = [f for _, _, files in os.walk(settings.effective_blob_dir) for f in files]
    assert len(blobs) == FILES  # no orphan from a lost race
