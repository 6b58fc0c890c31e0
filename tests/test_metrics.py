"""Prometheus metrics derived from heartbeat documents, and `--metrics-port`."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from typing import Any

import httpx
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sowcli.metrics import registry_for


class FakeStage:
    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc

    def status(self) -> dict[str, Any]:
        return self.doc


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_heartbeat_fields_become_counters_gauges_and_labels() -> None:
    doc = {
        "component": "publisher",
        "state": "running",
        "ts": 1.0,
        "simulated": True,
        "frames_in": 10,
        "nats_buffered": 3,
        "markets": {"SPOT": {"frames_in": 4, "state": "connected"}, "FUTURES": {"frames_in": 6}},
        "last_age_s": {"SPOT:BTCUSDT": 0.5},
        "unknown_symbols": ["SPOT:NOPE"],
        "source": "bybit",
    }
    text = generate_latest(registry_for(lambda: [("publisher", FakeStage(doc))])).decode()
    s = samples(text)
    assert s[("sow_publisher_frames_in_total", ())] == 10
    assert s[("sow_publisher_nats_buffered", ())] == 3
    assert s[("sow_publisher_simulated", ())] == 1
    assert s[("sow_publisher_state", (("state", "running"),))] == 1
    assert s[("sow_publisher_markets_frames_in_total", (("market", "SPOT"),))] == 4
    assert s[("sow_publisher_last_age_s", (("key", "SPOT:BTCUSDT"),))] == 0.5
    assert s[("sow_publisher_unknown_symbols_count", ())] == 1
    assert "# TYPE sow_publisher_frames_in_total counter" in text


def test_a_failing_status_does_not_break_the_scrape() -> None:
    class Broken:
        def status(self) -> dict[str, Any]:
            raise RuntimeError("boom")

    reg = registry_for(lambda: [("x", Broken()), ("y", FakeStage({"rows": 2}))])
    assert samples(generate_latest(reg).decode())[("sow_y_rows_total", ())] == 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_publish_serves_metrics_on_metrics_port(nats_server: Any) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SOW_", "NATS_"))}
    env["NATS_URL"] = nats_server.nats_url
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sowcli", "publish", "--source", "simulate", "--symbols", "BTCUSDT",
        "--metrics-port", str(port), env=env, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with httpx.AsyncClient() as client, asyncio.timeout(30):
            while True:
                try:
                    resp = await client.get(f"http://127.0.0.1:{port}/metrics")
                    if "sow_publisher_quotes_out_total" in resp.text:
                        value = samples(resp.text)[("sow_publisher_quotes_out_total", ())]
                        if value > 0:
                            break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
            missing = await client.get(f"http://127.0.0.1:{port}/nope")
            assert missing.status_code == 404
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 30) == 0
