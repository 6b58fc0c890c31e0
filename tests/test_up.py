"""`sow up --infra --source replay:...` end to end: the whole hub in one process, as a user runs it.

Quotes must reach Redis, QuestDB, the REST API and a WebSocket client; the metrics endpoints must
answer; Ctrl+C must stop everything cleanly and leave no process of sow's behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

import httpx
import orjson
import psycopg
import pytest
import redis.asyncio as aioredis
import websockets

from sowcli import infra
from sowcli.config import Settings
from sowcli.errors import UsageError
from sowcli.pipeline import select_stages
from sowcli.sources.simulate import _walks, linear_delta, linear_snapshot, spot_frames

pytestmark = pytest.mark.timeout(300)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_session(path: Path, symbols: list[str], seconds: float = 6.0) -> int:
    """A recording in sow's --record format: spot snapshots + book, linear snapshot + deltas."""
    import random

    rng = random.Random(7)
    spot, linear = _walks(symbols, rng), _walks(symbols, rng)
    t0 = 1_790_000_000.0
    lines = [
        {"t": "connect", "conn": "spot", "ts": t0, "addr": "wss://x/v5/public/spot"},
        {"t": "connect", "conn": "linear", "ts": t0, "addr": "wss://x/v5/public/linear"},
    ]
    for w in linear.values():
        lines.append(
            {
                "t": "recv",
                "conn": "linear",
                "ts": t0,
                "data": linear_snapshot(w, int(t0 * 1000)).decode(),
            }
        )
    quotes = len(symbols)
    steps = int(seconds / 0.1)
    for i in range(1, steps + 1):
        ts = t0 + i * 0.1
        for sym in symbols:
            spot[sym].step(rng)
            linear[sym].step(rng)
            ticker, book = spot_frames(spot[sym], int(ts * 1000), rng)
            lines.append({"t": "recv", "conn": "spot", "ts": ts, "data": book.decode()})
            lines.append({"t": "recv", "conn": "spot", "ts": ts, "data": ticker.decode()})
            delta = linear_delta(linear[sym], int(ts * 1000), rng)
            lines.append({"t": "recv", "conn": "linear", "ts": ts, "data": delta.decode()})
            quotes += 2
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    return quotes


def test_stage_selection() -> None:
    assert select_stages(None, None) == ["publish", "cache", "persist", "api"]
    assert select_stages("cache,publish", None) == ["publish", "cache"]
    assert select_stages(None, "persist") == ["publish", "cache", "api"]
    assert select_stages("serve-api", None) == ["api"]
    with pytest.raises(UsageError, match="--only: unknown stage bogus"):
        select_stages("bogus", None)
    with pytest.raises(UsageError, match="leave no stage"):
        select_stages("cache", "cache")


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _sow_pids() -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            any(part.endswith(b"sowcli") for part in cmd)
            and b"up" in cmd
            and alive(int(entry.name))
        ):
            pids.add(int(entry.name))
    return pids


async def test_sow_up_infra_replay_end_to_end(tmp_path: Path) -> None:
    if infra.find_redis_server() is None:
        if os.environ.get("SOW_REQUIRE_SERVICES") == "1":
            pytest.fail("no redis-server")
        pytest.skip("no redis-server")
    home = tmp_path / "home"
    symbols = ["BTCUSDT", "ETHUSDT"]
    session = tmp_path / "session.jsonl"
    expected = write_session(session, symbols)
    ports = {
        "nats": {"client": free_port(), "monitor": free_port()},
        "redis": {"client": free_port()},
        "questdb": {
            "http": free_port(),
            "pg": free_port(),
            "ilp": free_port(),
            "health": free_port(),
        },
    }
    # Record the ports in this SOW_HOME (what `sow infra up --port ...` does), then stop the
    # servers: `sow up --infra` must start them by itself.
    await asyncio.to_thread(infra.up, home, None, ports, questdb_heap="512m")
    await asyncio.to_thread(infra.down, home)

    api_port, metrics_port = free_port(), free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SOW_", "NATS_", "DRAGONFLY_", "QUESTDB_"))
    }
    env.update(SOW_HOME=str(home), SOW_QUESTDB_HEAP="512m")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sowcli", "up", "--infra",
        "--source", f"replay:{session}", "--speed", "4",
        "--symbols", ",".join(symbols), "--port", str(api_port), "--metrics-port", str(metrics_port),
        env=env, cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    states = {s.name: s for s in infra.status(home)}
    base = f"http://127.0.0.1:{api_port}"
    try:
        async with httpx.AsyncClient(timeout=5) as http, asyncio.timeout(180):
            # REST: the latest quotes of both markets, from the cache
            while True:
                try:
                    resp = await http.get(f"{base}/api/prices/latest")
                    if (
                        resp.status_code == 200
                        and len(
                            resp.json().get(
                                "quotes", resp.json() if isinstance(resp.json(), list) else []
                            )
                        )
                        >= 4
                    ):
                        break
                except httpx.TransportError:
                    pass
                if proc.returncode is not None:
                    raise AssertionError((await proc.stderr.read()).decode()[-3000:])  # type: ignore[union-attr]
                await asyncio.sleep(0.2)
            states = {s.name: s for s in infra.status(home)}
            assert all(states[n].healthy for n in ("nats", "redis", "questdb"))
            # Redis
            r = aioredis.from_url(f"redis://127.0.0.1:{ports['redis']['client']}/0")
            latest = await r.get("latest:futures:BTCUSDT")
            assert latest is not None and json.loads(latest)["symbol"] == "BTCUSDT"
            await r.aclose()
            # WebSocket: a snapshot of the latest quotes on subscribe
            async with websockets.connect(f"ws://127.0.0.1:{api_port}/ws") as ws:
                await ws.send(json.dumps({"type": "subscribe", "symbols": ["*"]}))
                while True:
                    msg = json.loads(await ws.recv())
                    if msg.get("type") == "snapshot":
                        break
                assert {(q["symbol"], q["market"]) for q in msg["quotes"]} >= {
                    ("BTCUSDT", "SPOT"),
                    ("BTCUSDT", "FUTURES"),
                }
            # QuestDB: every replayed quote, exactly once, once the replay is over
            pg = f"postgresql://admin:quest@127.0.0.1:{ports['questdb']['pg']}/qdb"
            while True:
                try:
                    async with await psycopg.AsyncConnection.connect(pg, autocommit=True) as conn:
                        cur = await conn.execute("SELECT count() FROM market_data")
                        row = await cur.fetchone()
                        if row is not None and row[0] == expected:
                            break
                        assert row is None or row[0] <= expected
                except psycopg.Error:
                    pass
                await asyncio.sleep(0.5)
            # metrics: the API's own and the all-stages endpoint
            api_metrics = await http.get(f"{base}/metrics")
            assert api_metrics.status_code == 200 and "sow_http_requests_total" in api_metrics.text
            stage_metrics = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
            for name in ("sow_publisher_quotes_out_total", "sow_cache_", "sow_persist_rows_total"):
                assert name in stage_metrics, name
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        await asyncio.to_thread(infra.down, home)
    assert proc.returncode == 0, err.decode()[-3000:]
    assert b"Traceback" not in err
    assert not _sow_pids(), "a `sow up` process is still running"
    for name in ("nats", "redis", "questdb"):
        pid = states[name].pid
        assert pid is not None and not alive(pid), f"{name} still running"


async def test_sow_up_says_which_server_is_missing(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SOW_", "NATS_", "DRAGONFLY_", "QUESTDB_"))
    }
    env.update(NATS_URL=f"nats://127.0.0.1:{free_port()}", DRAGONFLY_URL=f"127.0.0.1:{free_port()}")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sowcli", "up", "--only", "publish,cache", "--source", "simulate",
        env=env, cwd=tmp_path, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    text = err.decode()
    assert "nats at 127.0.0.1" in text and "redis at 127.0.0.1" in text and "sow up --infra" in text
    assert "questdb" not in text  # not needed by publish and cache
    assert "Traceback" not in text


def test_settings_have_api_defaults() -> None:
    s = Settings()
    assert (s.api_host, s.api_port) == ("127.0.0.1", 8080)
