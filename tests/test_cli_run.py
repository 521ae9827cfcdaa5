"""`longdoc run FILE`: one corpus document in this process with the extractive engine; readable output
by default, the record as JSON with --json; bad files end with one clear error line and exit 1,
usage and configuration errors with exit 2, never a traceback."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from config.settings import get_settings
from longdoc.cli import main
from tests.fixtures_workers import REPO_ROOT

GALERA = "contract-galera-joint-filing.pdf"  # 3 pages


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture):  # noqa: ANN201
    """main(["run", ...]) under extractive settings; returns (status, stdout, stderr)."""
    monkeypatch.setenv("LONGDOC_ENGINE", "extractive")
    monkeypatch.setenv("LONGDOC_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()

    def run(*args: str, **env: str) -> tuple[int, str, str]:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        get_settings.cache_clear()
        status = main(["--log-level", "WARNING", "run", *args])
        out, err = capsys.readouterr()
        return status, out, err

    yield run
    get_settings.cache_clear()


def test_readable_output_has_summary_answers_with_pages_and_label(run_cli, corpus_dir: Path) -> None:
    status, out, err = run_cli(str(corpus_dir / GALERA), "--question", "Who signs this agreement?",
                               "--labels", "contract,recipe,poem")
    assert status == 0, err
    assert out.splitlines()[0].endswith("(application/pdf, 3 pages)")
    assert "Summary (p" in out and "Q: Who signs this agreement?" in out
    answer = " ".join(out.split()).split(" A: ", 1)[1].split(" confidence ", 1)[0]  # lines are wrapped
    assert re.search(r"\(pp?\. \d", answer), answer
    assert "Label: contract (p = " in out


def test_json_is_the_record_with_each_task_result(run_cli, corpus_dir: Path) -> None:
    status, out, _ = run_cli(str(corpus_dir / GALERA), "--tasks", "summarize,qa", "--question", "Who are the parties?",
                             "--json")
    record = json.loads(out)
    assert status == 0 and record["status"] == "ok" and record["pages"] == 3
    assert set(record["results"]) == {"summarize", "qa"}  # only what --tasks named
    citations = record["results"]["summarize"]["citations"]
    assert citations and all(1 <= c["page_start"] <= c["page_end"] <= 3 for c in citations)


@pytest.mark.parametrize(("name", "code"), [
    ("hostile-encrypted-aes256-userpw.pdf", "password_required"),
    ("hostile-empty-0-bytes.pdf", "empty_file"),
    ("hostile-odt-renamed.pdf", "unsupported_media_type"),
    ("hostile-scanned-no-text.pdf", "no_text_layer"),
])
def test_a_bad_file_fails_with_its_code_and_no_traceback(run_cli, corpus_dir: Path, name: str, code: str) -> None:
    status, out, err = run_cli(str(corpus_dir / name))
    assert status == 1 and out == ""
    assert err.strip().splitlines()[-1].startswith(f"error: {corpus_dir / name}: {code}: "), err
    assert "Traceback" not in err


def test_limits_give_too_large_and_too_many_pages(run_cli, corpus_dir: Path) -> None:
    status, _, err = run_cli(str(corpus_dir / GALERA), LONGDOC_MAX_UPLOAD_BYTES="10000")
    assert status == 1 and ": too_large: " in err
    status, _, err = run_cli(str(corpus_dir / GALERA), LONGDOC_MAX_UPLOAD_BYTES="209715200", LONGDOC_MAX_PAGES="2")
    assert status == 1 and ": too_many_pages: " in err


def test_the_password_file_opens_an_encrypted_pdf(run_cli, corpus_dir: Path, tmp_path: Path) -> None:
    name = "hostile-encrypted-aes256-userpw.pdf"
    passwords = tmp_path / "passwords"
    passwords.write_text(f"# first a wrong one for every file, then this file's own\nnot-it\n{name}\tpassword\n")
    status, out, err = run_cli(str(corpus_dir / name), "--tasks", "summarize", "--password-file", str(passwords),
                               "--json")
    assert status == 0, err
    assert json.loads(out)["results"]["summarize"]["summary"]
    passwords.write_text("not-it\n")
    status, _, err = run_cli(str(corpus_dir / name), "--password-file", str(passwords))
    assert status == 1 and ": wrong_password: " in err


@pytest.mark.parametrize(("args", "says"), [
    (["--tasks", "nope"], "unknown task(s) nope"),
    (["--tasks", "qa"], "--question"),
    (["--labels", "only-one"], "labels"),
    (["--engine", "mpt"], "error: "),
])
def test_usage_and_configuration_errors_exit_2(run_cli, corpus_dir: Path, args: list[str], says: str) -> None:
    status, _, err = run_cli(str(corpus_dir / GALERA), *args)
    assert status == 2 and says in err and "Traceback" not in err


def test_the_installed_command_reports_a_bad_file_in_one_line(corpus_dir: Path, tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "LONGDOC_ENGINE": "extractive", "LONGDOC_DATA_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "longdoc.cli", "run", str(corpus_dir / "hostile-encrypted-aes256-userpw.pdf")],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "password_required" in proc.stderr and "Traceback" not in proc.stderr


def test_engine_mpt_runs_on_cpu_with_a_tiny_checkpoint(run_cli, corpus_dir: Path, tiny_ckpt: Path) -> None:
    """`--engine mpt` with LONGDOC_DEVICE=cpu: the same record and result schema as the extractive
    engine (random weights, so only the shape is checked)."""
    status, out, err = run_cli(str(corpus_dir / GALERA), "--engine", "mpt", "--model", str(tiny_ckpt),
                               "--tasks", "classify", "--json", LONGDOC_DEVICE="cpu")
    record = json.loads(out)
    assert status == 0, err
    result = record["results"]["classify"]
    assert result["engine"] == "mpt" and result["label"] in result["scores"]
