"""docker-compose.yml stays a valid Compose file (validated by the Compose client, no engine)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _compose() -> list[str]:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("no docker compose client installed")


def test_compose_file_is_valid_and_has_the_three_servers() -> None:
    cmd = _compose()
    out = subprocess.run(
        [*cmd, "-f", str(ROOT / "docker-compose.yml"), "config", "--services"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert {"nats", "dragonfly", "questdb"} <= set(out.stdout.split())
