"""`sow infra` and the server fixtures, against the real servers (no mocks)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sowcli import infra
from sowcli.cli.infra import app, parse_ports
from sowcli.errors import UsageError
from sowcli.infra import InfraError, ServerNotInstalled, ServerProcess
from tests.servers import questdb_query, start_or_skip, wait_questdb_applied

ROLES = {
    "nats": ("client", "monitor"),
    "redis": ("client",),
    "questdb": ("http", "pg", "ilp", "health"),
}


def _sow_infra(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``sow infra ARGS`` in a process of its own (servers from ``up`` must outlive it)."""
    code = "from sowcli.cli.infra import app; app(prog_name='sow infra')"
    env = {**os.environ, "SOW_HOME": str(home), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )


def _status(home: Path) -> tuple[int, dict[str, dict[str, Any]]]:
    done = _sow_infra(home, "status", "--format", "json")
    return done.returncode, {row["server"]: row for row in json.loads(done.stdout)}


def _require_programs() -> None:
    for what, find in (
        ("nats-server", infra.find_nats_server),
        ("a Redis-protocol server", infra.find_redis_server),
        ("Java", infra.find_java),
        ("the QuestDB jar", infra.ensure_questdb_jar),
    ):
        start_or_skip(what, find)


def test_up_status_up_down_round_trip(tmp_path: Path) -> None:
    _require_programs()
    home = tmp_path / "home"
    port_args = [
        f"--port={name}.{role}={infra.free_port()}" for name in ROLES for role in ROLES[name]
    ]
    try:
        done = _sow_infra(home, "up", "--questdb-heap", "512m", *port_args)
        assert done.returncode == 0, done.stderr
        assert "export NATS_URL=nats://127.0.0.1:" in done.stdout

        # the command has exited; its servers run on and answer
        rc, rows = _status(home)
        assert rc == 0
        assert {name: row["state"] for name, row in rows.items()} == dict.fromkeys(ROLES, "running")
        assert all(row["healthy"] and row["latency_ms"] is not None for row in rows.values())
        pids = {name: row["pid"] for name, row in rows.items()}
        assert all(infra.pid_alive(pid) for pid in pids.values())

        again = _sow_infra(home, "up", *port_args)
        assert again.returncode == 0, again.stderr
        assert "started" not in again.stdout
        assert {name: row["pid"] for name, row in _status(home)[1].items()} == pids

        table = _sow_infra(home, "status")
        assert table.returncode == 0
        assert all(name in table.stdout for name in ROLES) and "healthy" in table.stdout

        done = _sow_infra(home, "down")
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("stopped") == 3

        rc, rows = _status(home)
        assert rc == 3
        assert {name: row["state"] for name, row in rows.items()} == dict.fromkeys(ROLES, "stopped")
        assert not any(infra.pid_alive(pid) for pid in pids.values())
    finally:
        infra.down(home)


def test_up_reuses_a_healthy_server_and_down_leaves_it(
    redis_server: ServerProcess, tmp_path: Path
) -> None:
    port = redis_server.ports["client"]
    [result] = infra.up(tmp_path, only=["redis"], ports={"redis": {"client": port}})
    assert result.action == "reused"
    assert not result.server.managed
    assert infra.status(tmp_path, ["redis"])[0].state == "external"
    assert infra.down(tmp_path, ["redis"]) == {"redis": "left running (not started by sow)"}
    assert redis_server.healthy()


def test_up_refuses_a_port_taken_by_another_program(tmp_path: Path) -> None:
    start_or_skip("nats-server", infra.find_nats_server)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(InfraError, match=f"port {port} .*in use"):
            infra.up(tmp_path, only=["nats"], ports={"nats": {"client": port}})
    assert infra.status(tmp_path, ["nats"])[0].pid is None


def test_missing_redis_binary_says_how_to_get_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    monkeypatch.delenv("SOW_REDIS_SERVER", raising=False)
    with pytest.raises(ServerNotInstalled, match="apt-get install redis-server"):
        infra.start_redis(tmp_path)
    result = CliRunner().invoke(app, ["up", "--only", "redis", "--home", str(tmp_path)])
    assert isinstance(result.exception, ServerNotInstalled)
    assert not (tmp_path / "redis").exists() or not any((tmp_path / "redis").iterdir())


def test_missing_java_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOW_JAVA_HOME", str(tmp_path))
    with pytest.raises(ServerNotInstalled, match=r"SOW_JAVA_HOME=.* is not a JDK"):
        infra.find_java()


def test_bad_port_option_is_a_usage_error() -> None:
    assert parse_ports(["nats=1", "questdb.pg=2"]) == {"nats": {"client": 1}, "questdb": {"pg": 2}}
    with pytest.raises(UsageError, match="SERVER"):
        parse_ports(["postgres=5432"])
    with pytest.raises(UsageError, match="not a port"):
        parse_ports(["redis=99999"])


def test_every_infra_command_has_help_with_an_example() -> None:
    for command in ("up", "down", "status"):
        result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0
        assert "Example: sow infra " + command in result.output


async def test_nats_restart_keeps_port_and_jetstream_data(fresh_nats_server: ServerProcess) -> None:
    import nats

    server = fresh_nats_server
    ports, old_pid = dict(server.ports), server.pid
    nc = await nats.connect(server.nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    try:
        js = nc.jetstream()
        await js.add_stream(name="T", subjects=["t.>"])
        for i in range(3):
            await js.publish("t.x", str(i).encode())
        # in a thread, as a real outage: the client sees the drop while the server is down
        await asyncio.to_thread(server.restart)
        assert server.ports == ports and server.pid != old_pid
        info = await js.stream_info("T")  # the client reconnects on its own
        assert info.state.messages == 3
    finally:
        await nc.close()


def test_redis_restart_with_persistence_keeps_keys(tmp_path: Path) -> None:
    import redis

    server = start_or_skip(
        "a Redis-protocol server", lambda: infra.start_redis(tmp_path, persist=True)
    )
    try:
        client = redis.Redis.from_url(server.redis_url)
        client.set("k", "v")
        port = server.ports["client"]
        server.restart()
        assert server.ports["client"] == port
        assert redis.Redis.from_url(server.redis_url).get("k") == b"v"
    finally:
        server.stop()
    assert not server.running()


def test_questdb_stop_and_start_keeps_port_and_rows(fresh_questdb_server: ServerProcess) -> None:
    server = fresh_questdb_server
    questdb_query(
        server,
        "CREATE TABLE t (ts TIMESTAMP, s SYMBOL, v DOUBLE) TIMESTAMP(ts) PARTITION BY DAY WAL "
        "DEDUP UPSERT KEYS(ts, s)",
    )
    questdb_query(server, "INSERT INTO t VALUES ('2026-01-01T00:00:00Z', 'a', 1.0)")
    questdb_query(server, "INSERT INTO t VALUES ('2026-01-01T00:00:00Z', 'a', 2.0)")  # dedup
    wait_questdb_applied(server, "t", timeout=30)
    ports = dict(server.ports)
    server.stop()
    assert not server.running() and not server.healthy()
    server.restart()
    assert server.ports == ports
    assert questdb_query(server, "SELECT s, v FROM t") == [["a", 2.0]]


def test_session_servers_are_healthy_and_point_sow_at_themselves(
    nats_server: ServerProcess, redis_server: ServerProcess, questdb_server: ServerProcess
) -> None:
    env = {**nats_server.env_vars(), **redis_server.env_vars(), **questdb_server.env_vars()}
    assert env == {
        "NATS_URL": f"nats://127.0.0.1:{nats_server.ports['client']}",
        "DRAGONFLY_URL": f"redis://127.0.0.1:{redis_server.ports['client']}/0",
        "QUESTDB_URL": f"postgres://admin:quest@127.0.0.1:{questdb_server.ports['pg']}/qdb",
        "QUESTDB_HTTP_URL": f"http://127.0.0.1:{questdb_server.ports['http']}",
    }
    assert all(s.healthy() for s in (nats_server, redis_server, questdb_server))


def test_a_missing_program_skips_unless_services_are_required(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def missing() -> ServerProcess:
        raise ServerNotInstalled("no such server")

    monkeypatch.delenv("SOW_REQUIRE_SERVICES", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no such server"):
        start_or_skip("x", missing)
    monkeypatch.setenv("SOW_REQUIRE_SERVICES", "1")
    with pytest.raises(pytest.fail.Exception, match="no such server"):
        start_or_skip("x", missing)


def test_unknown_server_name_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["status", "--only", "mysql", "--home", str(tmp_path)])
    assert isinstance(result.exception, UsageError)
    assert "choose from nats, redis, questdb" in str(result.exception)
