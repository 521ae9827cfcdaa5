"""`longdoc batch DIR` in embedded mode over a copy of part of ../shared/corpus, hostile files included.

Every file is accounted for with the code tests/corpus_expectations.py gives it, a second run
processes nothing, and runs killed mid-way (SIGKILL; SIGINT to the whole process group, as a
terminal's Ctrl-C) resume to the same final results as one uninterrupted run. The extractive engine
throughout (no GPU); the uninterrupted run and the resumes run in this process, the killed runs as
real `longdoc batch` subprocesses.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from config.settings import Settings, get_settings
from longdoc.batch.journal import Journal
from longdoc.batch.records import normalized
from longdoc.cli import main
from tests.corpus_expectations import EXPECTED
from tests.fixtures_workers import REPO_ROOT, settings_env

# copy name -> corpus file. Small documents keep the test fast; the larger ones last give a killed run
# time to be killed mid-way.
SUBSET = {
    "a/contract-galera-joint-filing.pdf": "contract-galera-joint-filing.pdf",
    "a/contract-galera-joint-filing.txt": "contract-galera-joint-filing.txt",
    "a/copies/same-bytes-other-name.pdf": "contract-galera-joint-filing.pdf",  # identical file
    "a/form-sf424-page2.pdf": "form-sf424-page2.pdf",
    "a/README.md": "README.md",
    "b/hostile-copy-protected-ownerpw.pdf": "hostile-copy-protected-ownerpw.pdf",
    "b/hostile-corrupted-zen.pdf": "hostile-corrupted-zen.pdf",
    "b/hostile-empty-0-bytes.pdf": "hostile-empty-0-bytes.pdf",
    "b/hostile-encrypted-aes256-userpw.pdf": "hostile-encrypted-aes256-userpw.pdf",
    "b/hostile-no-startxref.pdf": "hostile-no-startxref.pdf",
    "b/hostile-odt-renamed.pdf": "hostile-odt-renamed.pdf",
    "b/hostile-scanned-no-text.pdf": "hostile-scanned-no-text.pdf",
    "b/hostile-xref-loop.pdf": "hostile-xref-loop.pdf",
    "c/contract-ivillage-sponsorship.pdf": "contract-ivillage-sponsorship.pdf",
    "c/report-ntsb-accident-nyc08ca055.pdf": "report-ntsb-accident-nyc08ca055.pdf",
}
QUESTION = "Who are the parties to this agreement?"
TASK_ARGS = ["--question", QUESTION, "--max-words", "60"]


def settings_for(tmp: Path) -> Settings:
    return Settings(_env_file=None, data_dir=tmp / "data", engine="extractive", pdf_extractor="pdfium",
                    parse_timeout_s=120.0)


@pytest.fixture(scope="module")
def corpus_copy(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("batch") / "docs"
    for copy, name in SUBSET.items():
        (root / copy).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(corpus_dir / name, root / copy)
    return root


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 (a callable running the CLI)
    """main([...]) in this process under the test's settings (the CLI reads get_settings())."""
    tmp = tmp_path_factory.mktemp("batch-env")
    env = {k: v for k, v in settings_env(settings_for(tmp)).items() if k.startswith("LONGDOC_")}
    patch = pytest.MonkeyPatch()
    for key in [k for k in os.environ if k.startswith("LONGDOC_")]:
        patch.delenv(key)
    for key, value in env.items():
        patch.setenv(key, value)
    get_settings.cache_clear()
    yield env
    patch.undo()
    get_settings.cache_clear()


def run_batch(capsys: pytest.CaptureFixture, root: Path, out: Path, *extra: str) -> tuple[int, str]:
    status = main(["--log-level", "WARNING", "batch", str(root), "--out", str(out), "--progress", "plain",
                   *TASK_ARGS, *extra])
    return status, capsys.readouterr().out


def records(path: Path) -> dict[str, dict]:
    lines = path.read_text().splitlines()
    return {r["path"]: r for r in map(json.loads, lines)}


def final_results(path: Path) -> list[dict]:
    return [normalized(r) for _, r in sorted(records(path).items())]


def settled_now(stdout: str) -> int:
    return int(re.search(r"settled by this run\s+(\d+)", stdout).group(1))


@pytest.fixture(scope="module")
def reference(corpus_copy: Path, cli_env: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run: the output every interrupted one must end at."""
    out = tmp_path_factory.mktemp("reference") / "results.jsonl"
    status = main(["--log-level", "WARNING", "batch", str(corpus_copy), "--out", str(out), "--progress", "plain",
                   *TASK_ARGS])
    assert status == 1  # hostile files failed
    return out


def test_every_file_is_accounted_for_and_failures_carry_codes(reference: Path) -> None:
    got = records(reference)
    assert sorted(got) == sorted(SUBSET)
    assert len(reference.read_text().splitlines()) == len(SUBSET)  # one line per file
    for copy, name in SUBSET.items():
        record, expected = got[copy], EXPECTED[name]
        if expected.status == "failed":
            assert record["status"] == "failed" and record["error"]["code"] == expected.code, record
            assert record["results"] == {}
            continue
        assert record["status"] == "ok", record
        if expected.pages is not None:
            assert record["pages"] == expected.pages, copy
        assert set(record["results"]) == {"summarize", "qa", "classify"}
        summary = record["results"]["summarize"]
        assert summary["summary"] and len(summary["summary"].split()) <= 60
        cited = summary["citations"] + [e for a in record["results"]["qa"]["answers"] for e in a["evidence"]]
        assert all(1 <= c["page_start"] <= c["page_end"] <= record["pages"] for c in cited), copy
        assert record["results"]["qa"]["answers"][0]["question"] == QUESTION
        scores = record["results"]["classify"]["scores"]
        assert abs(sum(scores.values()) - 1.0) < 1e-3 and record["results"]["classify"]["label"] in scores
    # Identical bytes under another path: processed once, reported for both paths.
    original, copy = got["a/contract-galera-joint-filing.pdf"], got["a/copies/same-bytes-other-name.pdf"]
    assert copy["duplicate_of"] == "a/contract-galera-joint-filing.pdf" and original["duplicate_of"] is None
    assert copy["results"] == original["results"] and copy["sha256"] == original["sha256"]


def test_second_run_processes_nothing_and_renders_csv_and_md(reference: Path, corpus_copy: Path, cli_env: dict,
                                                             capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    out = tmp_path / "again.jsonl"
    shutil.copyfile(reference, out)
    before = out.read_bytes()
    status, stdout = run_batch(capsys, corpus_copy, out)
    assert status == 1 and settled_now(stdout) == 0, stdout
    assert out.read_bytes() == before

    # csv / md are rendered from their journal: the same records, so nothing is processed either.
    for fmt in ("csv", "md"):
        target = tmp_path / f"report.{fmt}"
        shutil.copyfile(reference, target.with_name(target.name + ".journal.jsonl"))
        status, stdout = run_batch(capsys, corpus_copy, target)
        assert status == 1 and settled_now(stdout) == 0, stdout
    rows = (tmp_path / "report.csv").read_text().splitlines()
    assert len(rows) == 1 + len(SUBSET) and "answer_1_pages" in rows[0] and "label_probability" in rows[0]
    assert any("password_required" in row for row in rows)
    md = (tmp_path / "report.md").read_text()
    assert md.count("\n## ") == len(SUBSET) and "**Label:**" in md and "(p. " in md


def test_a_torn_last_line_is_dropped_and_its_file_processed_again(reference: Path, corpus_copy: Path,
                                                                  cli_env: dict, capsys: pytest.CaptureFixture,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "torn.jsonl"
    lines = reference.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # as a crash mid-write leaves it
    journal = Journal(out)
    assert journal.dropped_tail and len(journal.records) == len(lines) - 1
    journal.close()
    status, stdout = run_batch(capsys, corpus_copy, out)
    assert status == 1 and settled_now(stdout) == 1, stdout
    assert final_results(out) == final_results(reference)


def start_batch(root: Path, out: Path, env: dict) -> subprocess.Popen:
    """A real `longdoc batch` in its own process group (the test signals the group, as a terminal does)."""
    full_env = {**{k: v for k, v in os.environ.items() if not k.startswith("LONGDOC_")}, **env}
    return subprocess.Popen([sys.executable, "-m", "longdoc.cli", "--log-level", "INFO", "batch", str(root),
                             "--out", str(out), "--progress", "plain", "--concurrency", "1", *TASK_ARGS],
                            cwd=REPO_ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)


def wait_mid_way(proc: subprocess.Popen, out: Path, timeout: float = 60) -> int:
    """Until the run has processed at least one document with the engine, but not all files."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the batch ended before it could be interrupted:\n{proc.stdout.read()}"
        lines = out.read_text().splitlines() if out.exists() else []
        if any('"status":"ok"' in line and '"pages":' in line for line in lines):
            assert len(lines) < len(SUBSET)
            return len(lines)
        time.sleep(0.05)
    pytest.fail("the batch processed nothing in time")


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_a_run_killed_mid_way_resumes_to_the_uninterrupted_result(how: str, reference: Path, corpus_copy: Path,
                                                                  cli_env: dict, capsys: pytest.CaptureFixture,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "killed.jsonl"
    proc = start_batch(corpus_copy, out, cli_env)
    wait_mid_way(proc, out)
    os.killpg(proc.pid, getattr(signal, how))
    output, _ = proc.communicate(timeout=120)
    kept = records(out)  # every line a whole record (Journal would refuse a torn one in the middle)
    assert 0 < len(kept) < len(SUBSET)
    if how == "SIGINT":
        # Stopped cleanly: exit 130, the summary printed, and no in-flight parse turned into a failure
        # (the parser children ignore the terminal's Ctrl-C).
        assert proc.returncode == 130, output
        assert "stopped early" in output and "Traceback" not in output, output
        assert all(r["error"] is None or r["error"]["code"] == EXPECTED[SUBSET[p]].code for p, r in kept.items())
    else:
        assert proc.returncode == -signal.SIGKILL
    status, stdout = run_batch(capsys, corpus_copy, out)
    assert status == 1 and settled_now(stdout) == len(SUBSET) - len(kept), stdout
    assert final_results(out) == final_results(reference)
