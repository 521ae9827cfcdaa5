"""The batch's small parts on their own: the walk's filters, the task request and its key, the
password file, the journal's lock and compaction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from longdoc.batch.journal import Journal, JournalBusy, NotAJournal
from longdoc.batch.passwords import Passwords
from longdoc.batch.request import RequestError, build_request
from longdoc.batch.walk import scan_file, walk
from pipeline.tasks import TASKS, validate_params


def test_walk_filters_prunes_and_never_yields_its_own_outputs(tmp_path: Path) -> None:
    for rel in ["a.pdf", "b.txt", "sub/c.pdf", "sub/deep/d.pdf", ".git/objects/x", "results.jsonl"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    (tmp_path / "loop").symlink_to(tmp_path)  # a directory link back up: not followed
    own = {(tmp_path / "results.jsonl").resolve()}
    rels = [rel for rel, _ in walk(tmp_path, exclude=[".git"], skip=own)]
    assert rels == ["a.pdf", "b.txt", "sub/c.pdf", "sub/deep/d.pdf"]
    assert [r for r, _ in walk(tmp_path, include=["*.pdf"], exclude=[".git", "sub/deep/*"])] == ["a.pdf", "sub/c.pdf"]


def test_scan_judges_files_by_their_bytes(tmp_path: Path, corpus_dir: Path) -> None:
    renamed = tmp_path / "report.txt"
    renamed.write_bytes((corpus_dir / "contract-galera-joint-filing.pdf").read_bytes())
    assert scan_file("report.txt", renamed).media_type == "application/pdf"
    odt = scan_file("x.pdf", corpus_dir / "hostile-odt-renamed.pdf")
    assert odt.media_type is None and odt.error[0] == "unsupported_media_type" and odt.sha256
    assert scan_file("gone", tmp_path / "gone").error[0] == "unreadable"


def test_default_tasks_come_from_the_registry_and_the_key_follows_the_params() -> None:
    default = build_request(None)
    assert set(default.tasks) <= set(TASKS)
    for task in TASKS:  # exactly the tasks whose params are complete without any option
        try:
            validate_params(task, {})
            assert task in default.tasks
        except Exception:  # noqa: BLE001 - the registry refuses empty params for this task
            assert task not in default.tasks
    asked = build_request("summarize", question=["Who?"])
    assert asked.tasks == [t for t in TASKS if t in ("summarize", "qa")]  # --question implies qa
    assert asked.key("ab") != build_request("summarize", question=["Who else?"]).key("ab")
    assert asked.key("ab") == build_request("summarize", question=["  Who? "]).key("ab")  # normalized first
    with pytest.raises(RequestError, match="--question"):
        build_request("qa")


def test_password_candidates_specific_first_then_general(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    path.write_text("# comment\n\ngeneral one\nsecret/*.pdf\tfor secret\n*.pdf\tany pdf\n")
    passwords = Passwords.load(path)
    assert passwords.candidates("secret/a.pdf") == ["for secret", "any pdf", "general one"]
    assert passwords.candidates("b.txt") == ["general one"]
    assert "for secret" not in repr(passwords)


def test_journal_lock_compaction_and_refusing_other_files(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    journal = Journal(path)
    with pytest.raises(JournalBusy):
        Journal(path)
    for record in ({"path": "b", "n": 1}, {"path": "a", "n": 1}, {"path": "b", "n": 2}):
        journal.append(record)
    journal.compact()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"path": "a", "n": 1}, {"path": "b", "n": 2}]
    Journal(path).close()  # compaction released the lock
    other = tmp_path / "notes.txt"
    other.write_text("hello\n")
    with pytest.raises(NotAJournal):
        Journal(other)
