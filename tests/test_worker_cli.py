"""`longdoc worker` refuses to start where it could only fail later, with a message that says what to do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from config.settings import Settings
from longdoc.cli import build_parser
from tests.fixtures_workers import settings_env


def _worker(settings: Settings, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "longdoc.cli", "worker", *args], env=settings_env(settings),
                          cwd=cwd, capture_output=True, text=True, timeout=60)


def test_worker_refuses_an_unmigrated_database(pg_url: str, redis_url: str, tmp_path: Path) -> None:
    settings = Settings(_env_file=None, database_url=pg_url, broker_url=redis_url, data_dir=tmp_path)
    result = _worker(settings, tmp_path, "-Q", "parse")
    assert result.returncode == 2
    assert "longdoc db upgrade" in result.stderr


def test_worker_refuses_embedded_mode(tmp_path: Path) -> None:
    result = _worker(Settings(_env_file=None, data_dir=tmp_path), tmp_path, "-Q", "gpu")
    assert result.returncode == 2 and "LONGDOC_BROKER_URL" in result.stderr


@pytest.mark.parametrize("queues", ["cpu", ",", "gpu,bogus"])
def test_unknown_queue_names_are_rejected(queues: str) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "-Q", queues])


def test_queue_lists_are_parsed() -> None:
    assert build_parser().parse_args(["worker", "-Q", "parse, gpu,"]).queues == ["parse", "gpu"]
