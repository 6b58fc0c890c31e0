"""Shared fixtures: real servers (tests/servers.py) and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.servers import *  # noqa: F403  (real nats-server, redis-server, QuestDB)

RECORDING = (
    Path(__file__).resolve().parents[2] / "shared/data/bybit-v5-recording/bybit-2026-08-09.jsonl.gz"
)
SAMPLES = Path(__file__).resolve().parents[2] / "shared/reference/bybit-v5-samples.jsonl"


@pytest.fixture
def recording() -> Path:
    """The real Bybit recording from ../shared (skips when absent, e.g. on a user's machine)."""
    path = Path(os.environ.get("SOW_RECORDING", RECORDING))
    if not path.is_file():
        pytest.skip(f"recording not found: {path}")
    return path
