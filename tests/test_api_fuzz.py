"""Property-based fuzzing of `sow serve-api`: every endpoint of its OpenAPI document (schemathesis,
valid and invalid inputs) and the WebSocket protocol (hypothesis), against a real uvicorn server
over TCP backed by real NATS, Redis and QuestDB. The property: no input ever gets a 5xx or a
traceback; every error is JSON ``{"error": ..., "detail": ...}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from websockets.sync.client import ClientConnection, connect

from sowcli.config import Settings
from sowcli.infra import ServerProcess
from sowcli.model import Quote, encode_quote
from sowcli.runtime import new_event_loop
from sowcli.servers.api import ApiServer
from sowcli.servers.ws import bind_socket
from sowcli.sinks.cache import latest_key
from sowcli.sinks.questdb import MARKET_DATA_DDL
from tests.servers import questdb_query, wait_questdb_applied

pytestmark = pytest.mark.timeout(600)
EXAMPLES = 120  # per operation and generation mode


@pytest.fixture(scope="module")
def live_api(
    nats_server: ServerProcess, redis_server: ServerProcess, questdb_server: ServerProcess
) -> Iterator[str]:
    """`sow serve-api` on a free port, in its own thread and event loop, with data to find."""
    from questdb.ingress import Sender, TimestampNanos

    questdb_query(questdb_server, " ".join(MARKET_DATA_DDL.split()))
    now = datetime.now(UTC)
    conf = questdb_server.questdb_http_url.replace("http://", "http::addr=") + ";"
    with Sender.from_conf(conf) as sender:
        for i in range(120):
            for sym, market in (("BTCUSDT", "SPOT"), ("ETHUSDT", "FUTURES")):
                sender.row(
                    "market_data",
                    symbols={"symbol": sym, "market": market},
                    columns={"price": 100.0 + i % 7, "seq": 7_000_000 + i},
                    at=TimestampNanos(int((now - timedelta(minutes=i)).timestamp()) * 10**9),
                )
    wait_questdb_applied(questdb_server, "market_data")
    cache = redis.Redis.from_url(redis_server.redis_url)
    ts = int(now.timestamp() * 1000)
    q = Quote(symbol="BTCUSDT", market="SPOT", price=100.5, ts=ts, recv_us=ts * 1000, seq=1)
    cache.set(latest_key("SPOT", "BTCUSDT"), encode_quote(q))
    cache.close()

    config = dataclasses.replace(
        Settings(),
        nats_url=nats_server.nats_url,
        dragonfly_url=redis_server.redis_url,
        questdb_url=questdb_server.questdb_url,
        symbols=["BTCUSDT", "ETHUSDT"],
        api_rate_limit_per_second=0.0,
        ws_max_invalid_messages=1_000_000,
        api_static_dir="/nonexistent",
    )
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    loop = new_event_loop()
    stop = asyncio.Event()
    server = ApiServer(config)
    thread = threading.Thread(
        target=lambda: loop.run_until_complete(server.run(stop, sock=sock)), daemon=True
    )
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            if (
                httpx.get(f"{base}/health", timeout=2).json()["dependencies"]["nats"]["state"]
                == "up"
            ):
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the API never became healthy"
        time.sleep(0.05)
    try:
        yield base
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(20)
        loop.close()


def _spec() -> dict[str, Any]:
    """The OpenAPI document, from the app itself (no server needed to collect the tests)."""
    from sowcli.servers.api import create_app

    spec: dict[str, Any] = create_app(Settings()).openapi()
    return spec


schema = schemathesis.openapi.from_dict(_spec())
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=EXAMPLES
)


@schema.parametrize()
@settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case: Case[Any], live_api: str) -> None:
    response = case.call_and_validate(base_url=live_api, checks=[not_a_server_error])
    assert response.status_code < 500, (case.path, case.query, response.text)
    if response.status_code >= 400:
        assert response.headers.get("content-type", [""])[0].startswith("application/json")
        body = json.loads(response.text)
        assert set(body) == {"error", "detail"}, body
        assert "Traceback" not in response.text


def test_the_fuzzed_server_logged_no_5xx(live_api: str) -> None:
    """Belt and braces: the server's own counter of 5xx answers stays at zero."""
    text = httpx.get(f"{live_api}/metrics", timeout=5).text
    assert 'status="5' not in text
    answered = {
        status: sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("sow_http_requests_total{") and f'status="{status}' in line
        )
        for status in ("2", "4")
    }
    # the fuzzing above really ran, with valid and invalid requests
    assert answered["2"] > EXAMPLES and answered["4"] > EXAMPLES, answered


# --- the WebSocket protocol ------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)
SYMBOLS = st.lists(
    st.sampled_from(["*", "BTCUSDT", "ethusdt", "", "BTC-USDT", "💥", "A" * 31])
    | st.text(max_size=12)
    | st.integers(),
    max_size=6,
)
MESSAGES = st.one_of(
    st.text(max_size=200),
    st.builds(json.dumps, JSON_VALUES),
    st.builds(
        lambda kind, symbols: json.dumps({"type": kind, "symbols": symbols}),
        st.sampled_from(["subscribe", "unsubscribe", "ping", "SUBSCRIBE", "", "x"]),
        SYMBOLS | JSON_VALUES,
    ),
)
REPLIES = {"error", "snapshot", "unsubscribed", "pong"}


@pytest.fixture(scope="module")
def ws(live_api: str) -> Iterator[ClientConnection]:
    with connect(live_api.replace("http", "ws") + "/ws", max_size=None) as conn:
        assert json.loads(conn.recv(timeout=10))["type"] == "status"
        yield conn


@given(message=MESSAGES)
@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_every_websocket_message_gets_one_answer(ws: ClientConnection, message: str) -> None:
    ws.send(message)
    while True:
        doc = json.loads(ws.recv(timeout=10))
        if doc["type"] in REPLIES:  # anything else is a quote batch or a status update
            break
    if doc["type"] == "error":
        assert doc["error"] in ("bad_request", "rate_limited") and doc["detail"]
        if doc["error"] == "rate_limited":
            time.sleep(0.06)  # the client's own message budget: 20 a second
