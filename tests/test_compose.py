"""docker-compose.yml cannot run here (no Docker), so check what can rot silently: every longdoc
service runs a real `longdoc` subcommand, every LONGDOC_* name is a real setting with a valid value,
and the deployment has the pieces the design asks for."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from config.settings import Settings
from longdoc.cli import build_parser

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


def _longdoc_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items() if "build" in svc}


def test_every_longdoc_service_runs_a_real_subcommand(compose: dict[str, Any]) -> None:
    services = _longdoc_services(compose)
    assert {"api", "worker-parse", "worker-gpu"} <= set(services)
    parser = build_parser()
    for name, svc in services.items():
        command = svc["command"]
        assert isinstance(command, list) and command[0] == "longdoc", f"{name}: {command}"
        args = parser.parse_args(command[1:])  # argparse exits (fails the test) on anything unknown
        assert callable(args.func), name
    assert parser.parse_args(services["worker-parse"]["command"][1:]).queues == ["parse"]
    assert parser.parse_args(services["worker-gpu"]["command"][1:]).queues == ["gpu"]


def test_every_longdoc_env_name_is_a_setting_with_a_valid_value(compose: dict[str, Any]) -> None:
    fields = set(Settings.model_fields)
    seen = 0
    for name, svc in _longdoc_services(compose).items():
        env = svc.get("environment") or {}
        assert isinstance(env, dict), f"{name}: use the mapping form for environment"
        values = {}
        for key, value in env.items():
            if not key.startswith("LONGDOC_"):
                continue
            field = key.removeprefix("LONGDOC_").lower()
            assert field in fields, f"{name}: {key} is not a Settings field"
            values[field] = str(value)
            seen += 1
        Settings(_env_file=None, **values)  # types and Literal choices validate
        assert not values.get("broker_url", "x").startswith("redis://localhost"), name
    assert seen >= 5


def test_gpu_worker_reserves_an_nvidia_device_and_every_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    devices = compose["services"]["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    for name, svc in compose["services"].items():
        if name != "migrate":  # a one-shot job, not a service
            assert "healthcheck" in svc, f"{name} has no healthcheck"
    assert {"pgdata", "data"} <= set(compose["volumes"])
    # Exactly one service runs the reaper schedule.
    beats = [n for n, s in _longdoc_services(compose).items() if "--beat" in s["command"]]
    assert beats == ["worker-parse"]


def test_dockerfile_copies_every_package_and_the_migrations() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\S+?)/? ", dockerfile, flags=re.M))
    packages = {"longdoc", "pipeline", "storage", "workers", "api", "alembic"}
    assert packages <= copied, packages - copied
    assert "pip install -e ." in dockerfile  # storage.migrate resolves alembic/ next to the packages
