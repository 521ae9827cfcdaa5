"""A PDF password on the service path (issue 12): kept out of the broker and the logs, encrypted in the
documents row until the parse ends, read by whichever parse runs (a re-send by the reaper or the
reconciler included), and a re-upload with the password runs the jobs that failed for the lack of it.

Real Postgres, Redis and `longdoc worker` subprocesses; corpus PDFs encrypted here with a password
made for the test, so it can be searched for in every byte the broker and the logs hold.
"""

from __future__ import annotations

import base64
import json
import uuid
from datetime import timedelta
from pathlib import Path

import pypdf
import pytest
import redis
from cryptography.fernet import Fernet
from pydantic import SecretStr
from sqlalchemy import update

from config.settings import Settings
from storage.db import session_scope
from storage.models import Document, DocumentStatus, utcnow
from storage.passwords import PasswordUnreadable, decrypt_password, encrypt_password
from tests.fixtures_workers import ServiceSetup, api_client, poll_document, poll_job, upload
from workers import reaper
from workers.transport import get_dispatcher

SOURCES = ("contract-galera-joint-filing.pdf", "report-ntsb-accident-nyc08ca055.pdf")


@pytest.fixture
def keyed(service: ServiceSetup) -> ServiceSetup:
    """The service set-up with a LONGDOC_SECRET_KEY (the API and every worker get the same one)."""
    service.settings = service.settings.model_copy(update={"secret_key": SecretStr(Fernet.generate_key().decode())})
    return service


def _locked_pdf(corpus_dir: Path, tmp_path: Path, source: str) -> tuple[Path, str]:
    password = f"pw-{uuid.uuid4().hex}"
    writer = pypdf.PdfWriter(clone_from=corpus_dir / source)
    writer.encrypt(password, f"owner-{uuid.uuid4().hex}", algorithm="AES-256")
    path = tmp_path / f"locked-{source}"
    writer.write(path)
    return path, password


def _broker_bytes(settings: Settings) -> bytes:
    """Every value under this test's broker prefix, with each Celery message's base64 body decoded."""
    client = redis.Redis.from_url(settings.broker_url)
    parts: list[bytes] = []
    for key in client.scan_iter(match=f"{settings.broker_key_prefix}*"):
        kind = client.type(key)
        if kind == b"list":
            parts += client.lrange(key, 0, -1)
        elif kind == b"hash":
            parts += client.hvals(key)
        elif kind == b"zset":
            parts += client.zrange(key, 0, -1)
        elif kind == b"set":
            parts += list(client.smembers(key))
        elif kind == b"string":
            parts.append(client.get(key))
    decoded = []
    for part in parts:
        try:
            message = json.loads(part)
            decoded.append(base64.b64decode(message["body"]))
        except (ValueError, TypeError, KeyError):
            pass
    client.close()
    return b"\n".join(parts + decoded)


def _parse_messages(settings: Settings) -> int:
    client = redis.Redis.from_url(settings.broker_url)
    try:
        return int(client.llen(f"{settings.broker_key_prefix}parse"))
    finally:
        client.close()


def _stored_token(settings: Settings, doc_id: str) -> str | None:
    with session_scope(settings.effective_database_url) as s:
        return s.get(Document, uuid.UUID(doc_id)).encrypted_password


def test_the_password_is_never_in_the_broker_and_is_erased_after_the_parse(keyed: ServiceSetup, corpus_dir: Path,
                                                                           tmp_path: Path) -> None:
    settings = keyed.settings
    path, password = _locked_pdf(corpus_dir, tmp_path, SOURCES[0])
    with api_client(settings) as client:
        doc = upload(client, keyed.headers, path, password=password, tasks="summarize")
        # No worker yet: the parse message waits in Redis, as sent.
        assert _parse_messages(settings) == 1
        assert password.encode() not in _broker_bytes(settings)
        token = _stored_token(settings, doc["id"])
        assert token and password not in token and decrypt_password(settings, token) == password

        worker = keyed.start_worker()
        body = poll_document(client, keyed.headers, doc["id"], timeout=120)
        assert body["status"] == "parsed" and body["pages"] == 3, body
        assert poll_job(client, keyed.headers, doc["jobs"][0]["id"], timeout=180)["status"] == "succeeded"
    assert _stored_token(settings, doc["id"]) is None  # erased by the parse's own write
    assert password not in worker.log()
    assert password.encode() not in _broker_bytes(settings)


def test_a_parse_resent_by_the_reaper_or_the_reconciler_still_opens_the_pdf(keyed: ServiceSetup, corpus_dir: Path,
                                                                           tmp_path: Path) -> None:
    settings = keyed.settings
    (path_a, password_a), (path_b, password_b) = (_locked_pdf(corpus_dir, tmp_path, s) for s in SOURCES)
    with api_client(settings) as client:
        reaped = upload(client, keyed.headers, path_a, password=password_a)["id"]
        reconciled = upload(client, keyed.headers, path_b, password=password_b)["id"]
        # Redis lost both messages (a restart without appendonly), and then:
        redis.Redis.from_url(settings.broker_url).delete(f"{settings.broker_key_prefix}parse")
        long_ago = utcnow() - timedelta(seconds=2 * settings.reconcile_grace_s)
        with session_scope(settings.effective_database_url) as s:
            # ... a worker claimed the first one and vanished: its lease has expired;
            s.execute(update(Document).where(Document.id == uuid.UUID(reaped)).values(
                status=DocumentStatus.parsing, parse_attempts=1, lease_until=utcnow() - timedelta(seconds=60)))
            # ... the second one has waited past the grace since its message was sent.
            s.execute(update(Document).where(Document.id == uuid.UUID(reconciled)).values(
                updated_at=long_ago, enqueued_at=long_ago))
        counts = reaper.tick(settings, dispatcher=get_dispatcher(settings))
        assert (counts["requeued_documents"], counts["resent_documents"]) == (1, 1), counts
        assert _parse_messages(settings) == 2
        assert password_a.encode() not in _broker_bytes(settings) and password_b.encode() not in _broker_bytes(settings)

        keyed.start_worker("parse")
        for doc_id, pages in ((reaped, 3), (reconciled, 4)):
            body = poll_document(client, keyed.headers, doc_id, timeout=120)
            assert body["status"] == "parsed" and body["pages"] == pages, body
            assert _stored_token(settings, doc_id) is None


def test_a_reupload_with_the_password_runs_the_jobs_that_failed_without_it(keyed: ServiceSetup, corpus_dir: Path,
                                                                          tmp_path: Path) -> None:
    path, password = _locked_pdf(corpus_dir, tmp_path, SOURCES[0])
    keyed.start_worker()
    h = keyed.headers
    with api_client(keyed.settings) as client:
        first = upload(client, h, path, tasks="summarize,qa", question="Who are the parties?")
        body = poll_document(client, h, first["id"], timeout=120)
        assert body["status"] == "failed" and body["error"]["code"] == "password_required", body
        for job in first["jobs"]:
            assert poll_job(client, h, job["id"], timeout=30)["error"]["code"] == "password_required"

        again = upload(client, h, path, password=password)
        assert again["id"] == first["id"] and not again["created"] and again["status"] == "uploaded", again
        assert poll_document(client, h, first["id"], timeout=120)["status"] == "parsed"
        for job in first["jobs"]:
            done = poll_job(client, h, job["id"], timeout=180)
            assert done["status"] == "succeeded" and done["error"] is None and done["result"], done
            assert done["attempts"] == 1, done  # the password failure never claimed it; this run did once


def test_a_parse_worker_without_the_apis_key_fails_the_document_password_unreadable(
        keyed: ServiceSetup, corpus_dir: Path, tmp_path: Path) -> None:
    path, password = _locked_pdf(corpus_dir, tmp_path, SOURCES[0])
    keyed.start_worker(secret_key=None)  # a deployment mistake: the API has a key, this worker none
    with api_client(keyed.settings) as client:
        doc = upload(client, keyed.headers, path, password=password, tasks="summarize")
        body = poll_document(client, keyed.headers, doc["id"], timeout=120)
        assert body["status"] == "failed" and body["error"]["code"] == "password_unreadable", body
        assert "LONGDOC_SECRET_KEY" in body["error"]["message"]
        assert poll_job(client, keyed.headers, doc["jobs"][0]["id"], timeout=30)["error"]["code"] == "password_unreadable"
    assert _stored_token(keyed.settings, doc["id"]) is None  # a failed parse erases it too


def test_a_stored_password_needs_the_key_it_was_stored_with(tmp_path: Path) -> None:
    embedded = Settings(_env_file=None, data_dir=tmp_path / "data")
    token = encrypt_password(embedded, "open sesame")
    key_file = tmp_path / "data" / "secret.key"
    assert key_file.stat().st_mode & 0o777 == 0o600  # created on first use, readable by its owner only
    assert decrypt_password(embedded, token) == "open sesame"
    assert decrypt_password(Settings(_env_file=None, data_dir=tmp_path / "data"), token) == "open sesame"
    other_key = Settings(_env_file=None, data_dir=tmp_path / "data", secret_key=Fernet.generate_key().decode())
    with pytest.raises(PasswordUnreadable):
        decrypt_password(other_key, token)
    service_without_key = Settings(_env_file=None, data_dir=tmp_path / "data", broker_url="redis://127.0.0.1:1/0")
    with pytest.raises(PasswordUnreadable):
        decrypt_password(service_without_key, token)
