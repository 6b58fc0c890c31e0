"""The web dashboard (frontend/) in a real browser, against a real ``sow serve-api``.

Real nats-server, Redis and QuestDB (tests/servers.py) and the real stages — ``publish`` with the
simulated source, ``cache``, ``persist`` and ``serve-api``, which serves the static export
(frontend/out) at /market — running their own ``run`` coroutines in a background event loop. Debian's Chromium,
driven by playwright-core from ``frontend/e2e/market.e2e.mjs``, then checks what a user sees:
rows appear, prices change, search/filter/sort/favourites work, the phone layout fits, and the
detail page draws candles from /api/prices/{symbol}/{market}/ohlc with the live price.

A second test measures frame rate and store timings with 1,000 symbols at 1,000 updates/s
(reported, never asserted on wall time). Screenshots and JSON results land in test-artifacts/.

Needs node, Chromium (/usr/bin/chromium or $CHROMIUM_PATH), ``npm ci`` and ``npm run build`` in
frontend/ (``.ci/frontend.sh`` does both). Without them the tests skip, or fail under
``SOW_REQUIRE_SERVICES=1`` (CI).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sowcli.config import Settings
from sowcli.infra import ServerProcess
from sowcli.model import Quote
from sowcli.servers.ws import bind_socket
from tests.servers import wait_questdb_applied

pytestmark = pytest.mark.timeout(420)

REPO = Path(__file__).resolve().parents[1]
FRONTEND = REPO / "frontend"
EXPORT = FRONTEND / "out"
SCRIPT = FRONTEND / "e2e" / "market.e2e.mjs"
ARTIFACTS = Path(os.environ.get("SOW_TEST_ARTIFACTS", REPO / "test-artifacts"))
WAIT_S = 90.0  # upper bound of every poll below (a hang guard, not a performance threshold)
HISTORY_MINUTES = 240  # seeded 1-minute history before the live data, so the chart has candles


def unavailable(reason: str) -> None:
    if os.environ.get("SOW_REQUIRE_SERVICES") == "1":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser_tools() -> dict[str, str]:
    """node, Chromium, frontend/node_modules and the static export, or skip (fail in CI)."""
    node = shutil.which("node")
    if node is None:
        unavailable("node is not installed (the dashboard's browser test runs on Node.js)")
    chromium = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
    if not os.access(chromium, os.X_OK):
        unavailable(f"Chromium not found at {chromium} (apt-get install -y chromium)")
    if not (FRONTEND / "node_modules" / "playwright-core").is_dir():
        unavailable("frontend/node_modules is missing: run `npm ci` in frontend/ (.ci/frontend.sh)")
    if not (EXPORT / "index.html").is_file():
        unavailable("frontend/out is missing: run `npm run build` in frontend/ (.ci/frontend.sh)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return {"node": str(node), "chromium": chromium}


def run_script(
    tools: dict[str, str], *args: str, timeout_s: float
) -> subprocess.CompletedProcess[str]:
    """Run the browser script; its log is printed (pytest shows it on failure or with -s)."""
    env = {**os.environ, "CHROMIUM_PATH": tools["chromium"]}
    cmd = [tools["node"], str(SCRIPT), "--artifacts", str(ARTIFACTS), *args]
    proc = subprocess.run(
        cmd, cwd=FRONTEND, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    print(proc.stdout)
    print(proc.stderr, file=sys.stderr)
    return proc


# --- the hub: real services and the real stages ---------------------------------------------


class Pipeline(threading.Thread):
    """publish (simulated) → NATS → cache and persist, and serve-api: the stages' own ``run``
    coroutines (what the ``sow`` commands call) in one event loop on a thread of their own, so
    this test can drive the browser meanwhile."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="sow-pipeline", daemon=True)
        self.settings = settings
        self.sock = bind_socket("127.0.0.1", 0, what="serve-api")
        self.port: int = self.sock.getsockname()[1]
        self.errors: list[BaseException] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._started = threading.Event()

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        from sowcli.persist import Persister
        from sowcli.publish import Publisher, SourceSpec
        from sowcli.servers.api import ApiServer
        from sowcli.sinks.cache import CacheStage

        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        s = self.settings
        stages = {
            "persist": Persister(s).run(self._stop_event),
            "cache": CacheStage(s).run(self._stop_event),
            "serve-api": ApiServer(s).run(self._stop_event, sock=self.sock),
            "publish": Publisher(s, source=SourceSpec("simulate")).run(self._stop_event),
        }
        tasks = [asyncio.create_task(coro, name=name) for name, coro in stages.items()]
        self._started.set()
        for task in asyncio.as_completed(tasks):
            try:
                await task
            except BaseException as exc:  # a stage crashed: report it, stop the others
                self.errors.append(exc)
                self._stop_event.set()

    def check_alive(self) -> None:
        if self.errors:
            raise AssertionError(f"a stage crashed: {self.errors[0]!r}") from self.errors[0]
        if not self.is_alive() and self._started.is_set():
            raise AssertionError("the pipeline stopped by itself")

    def shutdown(self) -> None:
        if self._loop is not None and self._stop_event is not None:
            self._loop.call_soon_threadsafe(self._stop_event.set)
        self.join(30)


def get_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (urllib.error.URLError, OSError, ValueError):
        return 0, None


def eventually(pipeline: Pipeline, check: Any, what: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        pipeline.check_alive()
        result = check()
        if result:
            return result
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


async def seed_history(qdb: ServerProcess, symbol: str, now_ms: int) -> int:
    """Yesterday's persist, as it were: 1-minute ticks of ``symbol`` on both markets up to two
    minutes ago, written through the same QuestDB writer ``sow persist`` uses."""
    from sowcli.sinks.questdb import QuestDBWriter, add_quote, ensure_tables
    from sowcli.sources.simulate import base_price

    await asyncio.to_thread(ensure_tables, qdb.questdb_url)
    writer = QuestDBWriter(qdb.questdb_http_url)
    await writer.open()
    rng = random.Random(symbol)
    buffer = writer.new_buffer()
    rows = 0
    end = (now_ms // 60_000 - 2) * 60_000
    for market in ("SPOT", "FUTURES"):
        # a random walk run backwards from the simulator's start price, so history meets live
        prices = [base_price(symbol)]
        for _ in range(4 * HISTORY_MINUTES - 1):
            prices.append(prices[-1] * (1 + rng.gauss(0, 0.0015)))
        prices.reverse()
        for i, price in enumerate(prices):  # four ticks a minute
            ts = end - HISTORY_MINUTES * 60_000 + i * 15_000
            add_quote(buffer, Quote(symbol=symbol, market=market, price=price, volume=1.0,
                                    ts=ts, recv_us=ts * 1000, seq=ts))  # fmt: skip
            rows += 1
    try:
        await writer.write(buffer)
    finally:
        await writer.close()
    return rows


@pytest.fixture
def hub_url(
    browser_tools: dict[str, str],  # first: skip before starting any server
    fresh_nats_server: ServerProcess,
    redis_server: ServerProcess,
    questdb_server: ServerProcess,
) -> Iterator[tuple[str, list[str]]]:
    """A running hub (publish → NATS → cache/persist → serve-api) on simulated symbols of this
    test's own; yields (base URL, symbols). NATS is this test's own: its JetStream stream QUOTES
    must not collide with other tests' streams on ``quotes.>``."""
    tag = uuid.uuid4().hex[:4].upper()
    symbols = [f"{base}{tag}USDT" for base in ("BTC", "ETH", "SOL", "XRP", "DOGE", "ADA")]
    asyncio.run(seed_history(questdb_server, symbols[0], int(time.time() * 1000)))
    wait_questdb_applied(questdb_server, "market_data", 60)

    settings = dataclasses.replace(
        Settings(),
        symbols=symbols,
        validate_symbols=False,
        nats_url=fresh_nats_server.nats_url,
        dragonfly_url=redis_server.redis_url,
        questdb_url=questdb_server.questdb_url,
        questdb_http_url=questdb_server.questdb_http_url,
        api_static_dir=str(EXPORT),
        cache_queue_group=f"e2e-{tag}",
        heartbeat_interval_seconds=0.5,
    )
    pipeline = Pipeline(settings)
    pipeline.start()
    base = f"http://127.0.0.1:{pipeline.port}"
    try:
        eventually(
            pipeline, lambda: get_json(f"{base}/health")[0] == 200, "serve-api /health = 200"
        )

        def streams() -> bool:
            status, doc = get_json(f"{base}/api/prices/latest")
            return status == 200 and len((doc or {}).get("quotes", [])) >= 2 * len(symbols)

        eventually(pipeline, streams, "the latest quote of every symbol in the cache")

        def live_candles() -> bool:
            url = f"{base}/api/prices/{symbols[0]}/FUTURES/ohlc?interval=1m&from=5m"
            status, doc = get_json(url)
            return status == 200 and bool(doc and doc.get("count"))

        eventually(pipeline, live_candles, "candles of the live data, persisted")
        yield base, symbols
    finally:
        pipeline.shutdown()
    if pipeline.errors:
        raise AssertionError(f"a stage crashed: {pipeline.errors[0]!r}") from pipeline.errors[0]


def test_dashboard_in_chromium_against_serve_api(
    hub_url: tuple[str, list[str]], browser_tools: dict[str, str]
) -> None:
    base, symbols = hub_url
    proc = run_script(
        browser_tools,
        "--url", base,
        "--symbol", symbols[0],
        "--search", symbols[0][:3],
        "--rows", str(len(symbols)),
        "--min-candles", str(HISTORY_MINUTES // 2),
        timeout_s=300,
    )  # fmt: skip
    assert proc.returncode == 0, f"browser checks failed:\n{proc.stdout[-3000:]}"
    assert "not ok" not in proc.stdout
    results = json.loads((ARTIFACTS / "e2e-result.json").read_text())
    assert len(results["checks"]) >= 12 and all(c["ok"] for c in results["checks"])
    for shot in ("market.png", "market-phone.png", "detail.png"):
        assert (ARTIFACTS / shot).stat().st_size > 10_000, f"{shot} looks empty"


def test_dashboard_frame_rate_with_1000_symbols(browser_tools: dict[str, str]) -> None:
    """1,000 symbols × 2 markets, 1,000 updates/s over /ws (the mock hub of frontend/e2e speaks
    serve-api's protocol, so the load is exact and the Python stack adds no CPU noise)."""
    proc = run_script(browser_tools, "--perf", "--perf-seconds", "5", timeout_s=240)
    assert proc.returncode == 0, f"the measurement did not run:\n{proc.stdout[-3000:]}"
    report = json.loads((ARTIFACTS / "perf.json").read_text())
    for name, s in report["scenarios"].items():
        store = s["store"]
        print(
            f"{name}: {s['fps']} frames/s; store apply p50/p95 {store['apply_ms']['p50']}/"
            f"{store['apply_ms']['p95']} ms (state built in {store['build_ms']['p50']}/"
            f"{store['build_ms']['p95']} ms)"
        )
    loaded = report["scenarios"]["sorted_by_symbol"]
    # the load really happened (counts, not wall time)
    assert loaded["store"]["quotes_per_s"] > 500
    assert loaded["frames"] > 0
