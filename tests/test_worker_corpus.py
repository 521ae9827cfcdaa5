"""The whole shared corpus through ONE real `longdoc worker -Q parse` (PDFium extractor): every file ends
`parsed` or `failed` with the code tests/corpus_expectations.py gives it, nothing is left in flight,
and the same worker process is alive at the end and still parses."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select

from storage.blobs import BlobStore
from storage.db import session_scope
from storage.keys import authenticate
from storage.models import Document, DocumentStatus, Page
from tests.corpus_expectations import EXPECTED, corpus_files
from tests.fixtures_workers import ServiceSetup, api_client, poll_document, upload
from workers.transport import get_dispatcher

pytestmark = pytest.mark.slow


def _insert_behind_the_api(service: ServiceSetup, path: Path) -> str:
    """A file the API refuses up front still gets a row here, so the worker's own guard is tested too."""
    with path.open("rb") as f:
        sha256, size, _ = BlobStore(service.settings.effective_blob_dir).put_stream(f, 10**9)
    with session_scope(service.settings.effective_database_url) as s:
        owner = authenticate(s, service.api_key)
        doc = Document(filename=path.name, sha256=sha256, bytes=size, owner_id=owner.id)
        s.add(doc)
        s.flush()
        doc_id = doc.id
    get_dispatcher(service.settings).enqueue_parse(doc_id)
    return str(doc_id)


def test_every_corpus_file_through_one_worker(service: ServiceSetup, corpus_dir: Path) -> None:
    files = corpus_files(corpus_dir)
    assert set(files) == set(EXPECTED), "corpus and tests/corpus_expectations.py disagree"
    worker = service.start_worker("parse", "--concurrency", "2")
    doc_ids: dict[str, str] = {}
    with api_client(service.settings) as client:
        h = service.headers
        for name in files:
            path, expected = corpus_dir / name, EXPECTED[name]
            with path.open("rb") as f:
                resp = client.post("/v1/documents", headers=h, files={"file": (path.name, f, "application/pdf")})
            if resp.status_code in (400, 415):  # refused before storage: the API's own check
                assert expected.status == "failed" and resp.json()["error"]["code"] == expected.code, (name, resp.text)
                doc_ids[name] = _insert_behind_the_api(service, path)
            else:
                assert resp.status_code == 201, (name, resp.text)
                doc_ids[name] = resp.json()["id"]

        outcomes = {name: poll_document(client, h, doc_id, timeout=300) for name, doc_id in doc_ids.items()}

        # The same process is still serving: one more document parses after the whole corpus.
        assert worker.alive
        fresh = service.tmp / "after-corpus.txt"  # new bytes: a corpus file again would just dedupe
        fresh.write_text("The worker survived the whole corpus.\n\nSecond paragraph.\n")
        after = upload(client, h, fresh)
        assert poll_document(client, h, after["id"], timeout=60)["status"] == "parsed"

    mismatches = []
    for name, body in outcomes.items():
        expected = EXPECTED[name]
        got = (body["status"], (body["error"] or {}).get("code"))
        if got != (expected.status, expected.code):
            mismatches.append(f"{name}: expected {(expected.status, expected.code)}, got {got} {body['error']}")
        elif expected.status == "parsed":
            if expected.pages is not None and body["pages"] != expected.pages:
                mismatches.append(f"{name}: {body['pages']} pages, expected {expected.pages}")
            if expected.media_type and body["media_type"] != expected.media_type:
                mismatches.append(f"{name}: media type {body['media_type']}, expected {expected.media_type}")
            if not body["tokens"]:
                mismatches.append(f"{name}: parsed with no tokens")
    assert not mismatches, "\n".join(mismatches)

    with session_scope(service.settings.effective_database_url) as s:
        in_flight = s.scalar(select(func.count()).select_from(Document).where(
            Document.status.in_([DocumentStatus.uploaded, DocumentStatus.parsing])))
        assert in_flight == 0
        chars = dict(s.execute(select(Page.document_id, func.sum(func.length(Page.text))).group_by(Page.document_id)).all())
    for name, doc_id in doc_ids.items():
        expected = EXPECTED[name]
        if expected.status == "parsed":
            assert chars[uuid.UUID(doc_id)] >= expected.min_chars, name
    log = worker.log()
    assert worker.alive and log.count("Task longdoc.parse_document[") == 2 * (len(files) + 1)  # received + done
    assert "Traceback" not in log
