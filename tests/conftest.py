"""Shared fixtures: real servers (tests/servers.py) and small helpers."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client

from sowcli.infra import ServerProcess
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


@pytest.fixture
async def nc(nats_server: ServerProcess) -> AsyncIterator[Client]:
    """A NATS client on the session's server."""
    client = await nats.connect(nats_server.nats_url)
    yield client
    await client.close()


@pytest.fixture
async def redis(redis_server: ServerProcess) -> AsyncIterator[aioredis.Redis]:
    """A Redis client on the session's server."""
    client = aioredis.Redis.from_url(redis_server.redis_url)
    yield client
    await client.aclose()
