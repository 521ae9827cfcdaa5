"""Uploads, dedupe, idempotency, listing and deletion through the real app on real Postgres."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid

import redis
from sqlalchemy import create_engine, func, select, text

from storage.blobs import BlobStore
from storage.db import session_scope
from storage.models import Document, DocumentStatus, Job, JobStatus, utcnow
from storage.passwords import decrypt_password
from tests.fixtures_api import upload
from tests.fixtures_workers import free_port


def _queued_messages(api_redis_url: str, queue: str) -> int:
    return redis.Redis.from_url(api_redis_url).llen(queue)


def test_upload_creates_document_and_stores_blob(client, auth, pdf_bytes, api_settings, api_redis_url):
    r = upload(client, auth, pdf_bytes, name="../../etc/contract.pdf")
    assert r.status_code == 201, r.text
    doc = r.json()
    assert doc["sha256"] == hashlib.sha256(pdf_bytes).hexdigest()
    assert doc["bytes"] == len(pdf_bytes)
    assert doc["media_type"] == "application/pdf"
    assert doc["status"] == "uploaded"
    assert doc["filename"] == "contract.pdf"  # no client path survives
    assert doc["created"] is True and doc["jobs"] == []
    assert r.headers["location"] == f"/v1/documents/{doc['id']}"
    blob = BlobStore(api_settings.effective_blob_dir).path(doc["sha256"])
    assert blob.read_bytes() == pdf_bytes
    assert _queued_messages(api_redis_url, "parse") == 1  # enqueued after the commit, to the parse queue

    got = client.get(f"/v1/documents/{doc['id']}", headers=auth)
    assert got.status_code == 200 and got.json()["id"] == doc["id"]


def test_same_bytes_same_key_is_deduped(client, auth, pdf_bytes, api_settings, api_redis_url):
    first = upload(client, auth, pdf_bytes).json()
    again = upload(client, auth, pdf_bytes, name="renamed.pdf")
    assert again.status_code == 200
    assert again.json()["id"] == first["id"] and again.json()["created"] is False
    with session_scope(api_settings.effective_database_url) as s:
        assert s.scalar(select(func.count()).select_from(Document)) == 1
    assert _queued_messages(api_redis_url, "parse") == 1  # no second parse for the same document


def test_same_bytes_other_key_gets_its_own_document(client, auth, make_key, pdf_bytes):
    a = upload(client, auth, pdf_bytes).json()
    b = upload(client, make_key("bob"), pdf_bytes)
    assert b.status_code == 201 and b.json()["id"] != a["id"]


def test_idempotency_key(client, auth, pdf_bytes, other_pdf_bytes):
    key = {"Idempotency-Key": "req-42"}
    first = upload(client, auth, pdf_bytes, extra_headers=key)
    assert first.status_code == 201
    retry = upload(client, auth, pdf_bytes, extra_headers=key)
    assert retry.status_code == 200 and retry.json()["id"] == first.json()["id"]
    reused = upload(client, auth, other_pdf_bytes, extra_headers=key)
    assert reused.status_code == 409
    assert reused.json()["error"]["code"] == "idempotency_key_reused"
    # the conflicting upload left no document behind
    assert len(client.get("/v1/documents", headers=auth).json()["items"]) == 1


def test_idempotency_conflict_leaves_no_orphan_blob(client, auth, pdf_bytes, other_pdf_bytes, api_settings):
    upload(client, auth, pdf_bytes, extra_headers={"Idempotency-Key": "k"})
    upload(client, auth, other_pdf_bytes, extra_headers={"Idempotency-Key": "k"})
    assert not BlobStore(api_settings.effective_blob_dir).exists(hashlib.sha256(other_pdf_bytes).hexdigest())


def test_upload_with_tasks_creates_queued_jobs(client, auth, pdf_bytes, api_settings):
    r = upload(client, auth, pdf_bytes, data={
        "tasks": "summarize", "question": ["Who are the parties?", "When does it end?"], "labels": "lease, nda"})
    assert r.status_code == 201, r.text
    jobs = {j["task"]: j for j in r.json()["jobs"]}
    assert set(jobs) == {"summarize", "qa", "classify"}
    assert jobs["qa"]["params"]["questions"] == ["Who are the parties?", "When does it end?"]
    assert jobs["classify"]["params"]["labels"] == ["lease", "nda"]
    assert all(j["status"] == "queued" for j in jobs.values())
    with session_scope(api_settings.effective_database_url) as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 3


def test_upload_password_is_stored_encrypted_and_kept_out_of_the_message(client, auth, corpus_dir, api_settings,
                                                                         api_redis_url):
    secret = "s3cret-pw-zz"
    data = (corpus_dir / "hostile-encrypted-aes256-userpw.pdf").read_bytes()
    assert upload(client, auth, data, data={"password": secret}).status_code == 201
    with session_scope(api_settings.effective_database_url) as s:
        row = s.scalars(select(Document)).one()
        assert secret not in repr({c.key: getattr(row, c.key) for c in Document.__table__.columns})
        assert decrypt_password(api_settings, row.encrypted_password) == secret
        doc_id = str(row.id)
    raw = redis.Redis.from_url(api_redis_url).lindex("parse", 0)
    message = json.loads(raw)
    assert message["properties"]["body_encoding"] == "base64"
    args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    assert args == [doc_id] and kwargs == {}  # the parse reads the password from the row
    assert secret.encode() not in raw


def test_a_password_upload_without_a_secret_key_is_refused_before_anything_is_stored(
        api_settings, make_client, auth, corpus_dir, api_redis_url):
    client = make_client(api_settings.model_copy(update={"secret_key": None}))
    data = (corpus_dir / "hostile-encrypted-aes256-userpw.pdf").read_bytes()
    r = upload(client, auth, data, data={"password": "pw"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "secret_key_missing", r.text
    assert "LONGDOC_SECRET_KEY" in r.json()["error"]["message"]
    blobs = BlobStore(api_settings.effective_blob_dir)
    assert not blobs.exists(hashlib.sha256(data).hexdigest())
    with session_scope(api_settings.effective_database_url) as s:
        assert s.scalar(select(func.count()).select_from(Document)) == 0
    assert _queued_messages(api_redis_url, "parse") == 0
    assert upload(client, auth, data).status_code == 201  # without a password it is taken (and fails its parse)


def test_failed_password_document_is_reparsed_when_uploaded_with_password(client, auth, corpus_dir, api_settings,
                                                                           api_redis_url):
    data = (corpus_dir / "hostile-encrypted-aes256-userpw.pdf").read_bytes()
    first = upload(client, auth, data, data={"tasks": "summarize,classify"}).json()
    doc_id, (summary, classify) = first["id"], (j["id"] for j in first["jobs"])
    with session_scope(api_settings.effective_database_url) as s:  # what the parse task would record
        doc = s.get(Document, uuid.UUID(doc_id))
        doc.status, doc.error_code, doc.error_message = DocumentStatus.failed, "password_required", "needs pw"
        for job_id, code in ((summary, "password_required"), (classify, "internal_error")):
            job = s.get(Job, uuid.UUID(job_id))
            job.status, job.error_code, job.error_message, job.finished_at = JobStatus.failed, code, "x", utcnow()
    r = upload(client, auth, data, data={"password": "pw"})
    assert r.status_code == 200 and r.json()["status"] == "uploaded" and r.json()["error"] is None
    assert _queued_messages(api_redis_url, "parse") == 2
    with session_scope(api_settings.effective_database_url) as s:
        requeued, other = s.get(Job, uuid.UUID(summary)), s.get(Job, uuid.UUID(classify))
        # The job that failed for the password waits for the new parse; the parse releases it.
        assert (requeued.status, requeued.error_code, requeued.finished_at) == (JobStatus.queued, None, None)
        assert (other.status, other.error_code) == (JobStatus.failed, "internal_error")  # not the password's
    assert _queued_messages(api_redis_url, "gpu") == 0


def test_an_upload_while_the_database_is_down_leaves_no_blob(api_settings, make_client, pdf_bytes):
    # Auth off: with it on, the key lookup fails first (the key cache is off while its listener is down).
    down = api_settings.model_copy(update={
        "database_url": f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/down", "auth_enabled": False})
    r = upload(make_client(down), {}, pdf_bytes)
    assert r.status_code == 503 and r.json()["error"]["code"] == "database_unavailable", r.text
    blobs = BlobStore(api_settings.effective_blob_dir)
    assert not blobs.exists(hashlib.sha256(pdf_bytes).hexdigest())
    assert list((blobs.root / "tmp").iterdir()) == []


def _refuse_commits_of(url: str, filename: str) -> None:
    """A deferred constraint trigger that fails COMMIT (SQLSTATE 08006, a connection failure) of a
    document row with this filename: the transaction fails after everything before COMMIT succeeded."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE FUNCTION refuse_commit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                          "RAISE EXCEPTION 'refused at commit' USING ERRCODE = '08006'; END $$"))
        conn.execute(text("CREATE CONSTRAINT TRIGGER refuse_commit AFTER INSERT ON documents "
                          "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
                          f"WHEN (NEW.filename = '{filename}') EXECUTE FUNCTION refuse_commit()"))
    engine.dispose()


def test_an_upload_whose_rows_fail_to_commit_leaves_no_orphan_blob(client, make_key, api_settings, pdf_bytes,
                                                                    other_pdf_bytes):
    alice, bob = make_key("alice"), make_key("bob")
    assert upload(client, alice, pdf_bytes).status_code == 201
    _refuse_commits_of(api_settings.effective_database_url, "refused.pdf")
    blobs = BlobStore(api_settings.effective_blob_dir)
    fresh = upload(client, bob, other_pdf_bytes, name="refused.pdf")
    assert fresh.status_code == 503 and fresh.json()["error"]["code"] == "database_unavailable", fresh.text
    assert not blobs.exists(hashlib.sha256(other_pdf_bytes).hexdigest())  # no row refers to it: removed
    shared = upload(client, bob, pdf_bytes, name="refused.pdf")
    assert shared.status_code == 503, shared.text
    assert blobs.exists(hashlib.sha256(pdf_bytes).hexdigest())  # alice's document still uses these bytes
    assert list((blobs.root / "tmp").iterdir()) == []  # no staged upload left behind either
    with session_scope(api_settings.effective_database_url) as s:
        assert s.scalar(select(func.count()).select_from(Document)) == 1


def test_list_documents_cursor_pagination(client, auth, corpus_dir):
    pdfs = sorted(corpus_dir.glob("contract-*.pdf"))[:5]
    ids = [upload(client, auth, p.read_bytes(), name=p.name).json()["id"] for p in pdfs]
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        body = client.get("/v1/documents", headers=auth, params=params).json()
        seen += [d["id"] for d in body["items"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == list(reversed(ids))  # newest first, each exactly once


def test_delete_removes_rows_and_unused_blob(client, auth, make_key, pdf_bytes, api_settings):
    blobs = BlobStore(api_settings.effective_blob_dir)
    sha = hashlib.sha256(pdf_bytes).hexdigest()
    mine = upload(client, auth, pdf_bytes, data={"tasks": "summarize"}).json()
    bob = make_key("bob")
    theirs = upload(client, bob, pdf_bytes).json()

    assert client.delete(f"/v1/documents/{mine['id']}", headers=auth).status_code == 204
    assert client.get(f"/v1/documents/{mine['id']}", headers=auth).status_code == 404
    assert client.get(f"/v1/jobs/{mine['jobs'][0]['id']}", headers=auth).status_code == 404
    assert blobs.exists(sha)  # bob's document still uses the bytes

    assert client.delete(f"/v1/documents/{theirs['id']}", headers=bob).status_code == 204
    assert not blobs.exists(sha)
    with session_scope(api_settings.effective_database_url) as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0
    assert client.delete(f"/v1/documents/{theirs['id']}", headers=bob).status_code == 404


def test_concurrent_uploads_of_the_same_bytes_make_one_document(client, auth, pdf_bytes, api_settings):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: upload(client, auth, pdf_bytes), range(4)))
    assert sorted(r.status_code for r in responses) == [200, 200, 200, 201]
    assert len({r.json()["id"] for r in responses}) == 1
    with session_scope(api_settings.effective_database_url) as s:
        assert s.scalar(select(func.count()).select_from(Document)) == 1


def test_concurrent_owner_less_uploads_on_sqlite_make_one_document(api_settings, make_client, pdf_bytes, tmp_path):
    """Auth off on the embedded store: no unique index covers NULL owners, the write lock does."""
    from concurrent.futures import ThreadPoolExecutor

    from storage import migrate

    url = f"sqlite:///{tmp_path / 'embedded.db'}"
    migrate.upgrade(url)
    client = make_client(api_settings.model_copy(update={"database_url": url, "auth_enabled": False}))
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: upload(client, {}, pdf_bytes), range(4)))
    assert sorted(r.status_code for r in responses) == [200, 200, 200, 201], [r.text for r in responses]
    with session_scope(url) as s:
        assert s.scalar(select(func.count()).select_from(Document)) == 1
