"""Real servers for the tests: NATS (JetStream), a Redis-protocol server and QuestDB on free ports.

They are started by :mod:`sowcli.infra`, the code behind ``sow infra``, each in its own temporary
folder. Session-scoped fixtures (``nats_server``, ``redis_server``, ``questdb_server``) are shared
by the whole run; the ``fresh_*`` variants give one test its own server to stop, kill or restart.

A server whose program is missing (no redis-server, no Java 25, no QuestDB jar and no Maven)
skips the tests that need it, unless ``SOW_REQUIRE_SERVICES=1`` (CI), where it fails them.

``tests/conftest.py`` imports everything here with ``from tests.servers import *``.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sowcli.infra import (
    ServerNotInstalled,
    ServerProcess,
    questdb_wal_pending,
    start_nats,
    start_questdb,
    start_redis,
)

__all__ = [
    "fresh_nats_server",
    "fresh_questdb_server",
    "fresh_redis_server",
    "nats_server",
    "questdb_query",
    "questdb_server",
    "redis_server",
    "start_or_skip",
    "wait_questdb_applied",
]

# QuestDB's heap in tests (its data lives off-heap; 512m is plenty for test tables)
QUESTDB_TEST_HEAP = os.environ.get("SOW_TEST_QUESTDB_HEAP", "512m")


T = TypeVar("T")


def start_or_skip(what: str, start: Callable[[], T]) -> T:
    """``start()``, or skip (fail under ``SOW_REQUIRE_SERVICES=1``) when the program is missing."""
    try:
        return start()
    except ServerNotInstalled as exc:
        reason = f"{what} is not available here: {exc}"
        if os.environ.get("SOW_REQUIRE_SERVICES") == "1":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


def _serve(what: str, start: Callable[[], ServerProcess]) -> Iterator[ServerProcess]:
    server = start_or_skip(what, start)
    try:
        yield server
    finally:
        server.stop()


def _start_questdb(home: Path) -> ServerProcess:
    return start_questdb(home, heap=QUESTDB_TEST_HEAP)


# --- one server for the whole run ----------------------------------------------------------


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """nats-server with JetStream; ``.nats_url``. Don't stop it: use ``fresh_nats_server``."""
    home = tmp_path_factory.mktemp("nats")
    yield from _serve("nats-server", lambda: start_nats(home))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A Redis-protocol server without persistence; ``.redis_url``. Tests share it: use own keys."""
    home = tmp_path_factory.mktemp("redis")
    yield from _serve("a Redis-protocol server", lambda: start_redis(home))


@pytest.fixture(scope="session")
def questdb_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """QuestDB; ``.questdb_url`` (PG wire) and ``.questdb_http_url``. Tests share it: own tables."""
    home = tmp_path_factory.mktemp("questdb")
    yield from _serve("QuestDB", lambda: _start_questdb(home))


# --- one server per test (to stop, kill or restart) ----------------------------------------


@pytest.fixture
def fresh_nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A nats-server of this test's own; ``.restart()`` keeps its port and JetStream store."""
    home = tmp_path_factory.mktemp("fresh-nats")
    yield from _serve("nats-server", lambda: start_nats(home))


@pytest.fixture
def fresh_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A Redis-protocol server of this test's own (no persistence: a restart empties it)."""
    home = tmp_path_factory.mktemp("fresh-redis")
    yield from _serve("a Redis-protocol server", lambda: start_redis(home))


@pytest.fixture
def fresh_questdb_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A QuestDB of this test's own; ``.stop()`` then ``.restart()`` keeps its ports and data."""
    home = tmp_path_factory.mktemp("fresh-questdb")
    yield from _serve("QuestDB", lambda: _start_questdb(home))


# --- QuestDB helpers -----------------------------------------------------------------------


def questdb_query(server: ServerProcess, sql: str, timeout_s: float = 10.0) -> list[list[Any]]:
    """Rows of ``sql`` run through QuestDB's HTTP ``/exec`` (raises AssertionError on an error)."""
    url = f"{server.questdb_http_url}/exec?" + urllib.parse.urlencode({"query": sql})
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            data: dict[str, Any] = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")
        raise AssertionError(f"QuestDB refused {sql!r}: {body}") from None
    if "error" in data:
        raise AssertionError(f"QuestDB refused {sql!r}: {data['error']}")
    rows: list[list[Any]] = data.get("dataset", [])
    return rows


def wait_questdb_applied(server: ServerProcess, table: str, timeout: float = 30.0) -> None:
    """Wait until every WAL transaction of ``table`` is applied (``writerTxn = sequencerTxn``).

    QuestDB applies WAL commits asynchronously, so a test reads only after this returns. Fails
    the test when the table is missing, suspended or still behind after ``timeout`` seconds.
    Call it through ``asyncio.to_thread`` from async tests.
    """
    deadline = time.monotonic() + timeout
    pending: dict[str, int] = {}
    while time.monotonic() < deadline:
        pending = questdb_wal_pending(server, table)
        if pending.get(table) == 0:
            return
        time.sleep(0.05)
    if table not in pending:
        raise AssertionError(f"QuestDB has no WAL table {table!r} after {timeout} s")
    raise AssertionError(
        f"QuestDB table {table!r} still has {pending[table]} WAL transaction(s) to apply "
        f"after {timeout} s"
    )
