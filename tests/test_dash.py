"""`sow dash`: the pure render on fixed state (text snapshots at 80 and 160 columns), the health
thresholds, column dropping, the NATS side against a real nats-server, and one end-to-end run in
a tmux pseudo-terminal with a simulated publisher."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import typer
from rich.console import Console, RenderableType
from typer.testing import CliRunner

from sowcli.cli import dash as dash_cli
from sowcli.config import Settings
from sowcli.errors import UsageError
from sowcli.infra import ServerProcess
from sowcli.model import Market, Quote, encode_quote
from sowcli.ui.dash import (
    DOWN_BEATS,
    DROP_ORDER,
    FRESH_BEATS,
    HIGHLIGHT_S,
    TREND_HOLD_S,
    ComponentBoard,
    DashFeed,
    DashOptions,
    DashState,
    PriceCell,
    QuoteBoard,
    RateMeter,
    Thresholds,
    age_health,
    component_chips,
    counters,
    fit_columns,
    judge,
    make_options,
    quote_subjects,
    render,
    state_health,
)
from sowcli.ui.format import fmt_age, fmt_compact

NOW = 1_786_000_000.0  # 2026-08-06 07:06:40 UTC


def text_of(renderable: RenderableType, width: int) -> str:
    """What a colourless ``width``-column terminal shows (trailing blanks stripped)."""
    console = Console(
        width=width, file=io.StringIO(), color_system=None, legacy_windows=False, highlight=False
    )
    console.print(renderable)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    return "\n".join(line.rstrip() for line in out.splitlines())


def quote(symbol: str, market: Market, price: float, **kw: Any) -> Quote:
    values: dict[str, Any] = {
        "volume": 12_345.6,
        "turnover": price * 12_345.6,
        "high24h": price * 1.02,
        "low24h": price * 0.97,
        "change24h": 1.234,
    }
    values.update(kw)
    return Quote(
        symbol=symbol, market=market, price=price, ts=int(NOW * 1000), recv_us=int(NOW * 1e6),
        **values,
    )  # fmt: skip


PUBLISHER = {
    "component": "publisher",
    "state": "running",
    "source": "simulate",
    "simulated": True,
    "markets": {"SPOT": {"state": "running"}, "FUTURES": {"state": "running"}},
    "stale_symbols": [],
    "nats_dropped": 0,
}


def fixed_state(options: DashOptions | None = None) -> DashState:
    """Three symbols, a simulated publisher, a degraded cache, a silent ws, no persist."""
    st = DashState.new(options or DashOptions(), "nats://127.0.0.1:4222", NOW - 60)
    st.link.set("connected", NOW - 59)
    add = st.quotes.add
    add(quote("BTCUSDT", "SPOT", 95_000.0), NOW - 2)
    add(quote("BTCUSDT", "SPOT", 95_012.34), NOW - 0.3)  # moved up 0.3 s ago: ↗, highlighted
    add(quote("BTCUSDT", "FUTURES", 95_050.1, change24h=1.3), NOW - 1)
    add(quote("ETHUSDT", "SPOT", 3_400.5, change24h=-2.5), NOW - 3)
    add(quote("ETHUSDT", "FUTURES", 3_399.1, change24h=-2.4), NOW - 3)
    add(quote("ETHUSDT", "FUTURES", 3_398.7, change24h=-2.4), NOW - 2)  # moved down 2 s ago: ↘
    add(quote("DOGEUSDT", "SPOT", 0.201234, change24h=0.0), NOW - 45)  # stale (> 30 s)
    st.components.add("publisher", dict(PUBLISHER), NOW - 0.5)
    st.components.add("cache", {"component": "cache", "state": "degraded", "dropped": 3}, NOW - 0.5)
    st.components.add("ws", {"component": "ws", "state": "running", "clients": 4}, NOW - 5)
    return st


# --- snapshots ------------------------------------------------------------------------------------

SNAPSHOT_160 = """\
sow dash  07:06:40 UTC   SIMULATED DATA   3 symbols · sort change
🟢 nats  🟢 publisher/spot  🟢 publisher/futures  🟡 cache degraded  🔴 persist no heartbeat  🟡 ws silent 5.0s
quotes/s 2 · exchange sockets 0 · clients 4 · dropped 3 · stale 1
Symbol           Spot      Futures    Basis   24h %   High 24h    Low 24h  Vol 24h   Age
BTCUSDT   95,012.34 ↗  95,050.10 →  +0.040%  +1.23%  96,912.59  92,161.97    1.17B  0.3s
DOGEUSDT   0.201234 →            -        -  +0.00%   0.205259   0.195197    2.48K   45s
ETHUSDT    3,400.50 →   3,398.70 ↘  -0.053%  -2.50%   3,468.51   3,298.49   41.98M  2.0s
Ctrl+C to quit"""

SNAPSHOT_80 = """\
sow dash  07:06:40 UTC   SIMULATED DATA   3 symbols · sort change
🟢 nats  🟢 publisher/spot  🟢 publisher/futures  🟡 cache degraded
🔴 persist no heartbeat  🟡 ws silent 5.0s
quotes/s 2 · exchange sockets 0 · clients 4 · dropped 3 · stale 1
Symbol           Spot      Futures    Basis   24h %   High 24h  Vol 24h   Age
BTCUSDT   95,012.34 ↗  95,050.10 →  +0.040%  +1.23%  96,912.59    1.17B  0.3s
DOGEUSDT   0.201234 →            -        -  +0.00%   0.205259    2.48K   45s
ETHUSDT    3,400.50 →   3,398.70 ↘  -0.053%  -2.50%   3,468.51   41.98M  2.0s
Ctrl+C to quit"""


@pytest.mark.parametrize(("width", "expected"), [(160, SNAPSHOT_160), (80, SNAPSHOT_80)])
def test_render_snapshot(width: int, expected: str) -> None:
    screen = text_of(render(fixed_state(), NOW, DashOptions(), width=width, height=40), width)
    assert screen == expected, "\n" + screen


def test_every_line_fits_80_columns_by_dropping_the_least_important_columns() -> None:
    st = fixed_state()
    st.quotes.add(quote("1000PEPEUSDT", "FUTURES", 0.0123456, turnover=1.5e12), NOW - 1)
    screen = text_of(render(st, NOW, DashOptions(), width=80, height=40), 200)
    from rich.cells import cell_len

    assert max(cell_len(line) for line in screen.splitlines()) <= 80
    header = next(line for line in screen.splitlines() if line.startswith("Symbol"))
    assert "Low 24h" not in header  # the first column to go
    for kept in ("Spot", "Futures", "Basis", "24h %", "Age"):
        assert kept in header


def test_fit_columns_drops_in_order_and_keeps_symbol_and_prices() -> None:
    widths = {
        "symbol": 8, "spot": 11, "futures": 11, "basis": 7, "change": 6,
        "high": 9, "low": 9, "volume": 7, "age": 4,
    }  # fmt: skip
    assert fit_columns(widths, 200) == list(widths)

    def gaps(keys: list[str] | dict[str, int]) -> int:
        return sum(widths[k] for k in keys) + 2 * (len(keys) - 1)

    previous = list(widths)
    for width in range(gaps(widths) - 1, 10, -1):
        keep = fit_columns(widths, width)
        assert {"symbol", "spot", "futures"} <= set(keep)
        dropped = [k for k in widths if k not in keep]
        assert set(dropped) == set(DROP_ORDER[: len(dropped)])  # the first ones of DROP_ORDER
        if len(keep) > 3:
            assert gaps(keep) <= width
        assert set(keep) <= set(previous)
        previous = keep


def test_market_option_shows_one_price_column_and_no_basis() -> None:
    options = DashOptions(market="FUTURES")
    st = fixed_state(options)
    screen = text_of(render(st, NOW, options, width=120, height=40), 120)
    header = next(line for line in screen.splitlines() if line.startswith("Symbol"))
    assert "Futures" in header and "Spot" not in header and "Basis" not in header
    assert "DOGEUSDT" not in screen  # SPOT-only symbol: filtered out
    assert "publisher/spot" not in screen and "publisher/futures" in screen


def test_sort_orders() -> None:
    def order(sort: str) -> list[str]:
        options = DashOptions(sort=sort)  # type: ignore[arg-type]
        screen = text_of(render(fixed_state(), NOW, options, width=160, height=40), 160)
        return re.findall(r"^(\w+USDT) ", screen, re.M)

    assert order("change") == ["BTCUSDT", "DOGEUSDT", "ETHUSDT"]
    assert order("symbol") == ["BTCUSDT", "DOGEUSDT", "ETHUSDT"]
    assert order("volume") == ["BTCUSDT", "ETHUSDT", "DOGEUSDT"]  # USDT turnover, not base units
    assert order("basis") == ["BTCUSDT", "ETHUSDT", "DOGEUSDT"]  # no basis (no FUTURES) last


def test_a_short_terminal_shows_how_many_rows_are_hidden() -> None:
    st = fixed_state()
    for i in range(30):
        st.quotes.add(quote(f"SYM{i:02d}USDT", "SPOT", 1.0 + i), NOW - 1)
    screen = text_of(render(st, NOW, DashOptions(sort="symbol"), width=120, height=20), 120)
    assert len(screen.splitlines()) <= 20
    assert re.search(r"\+ \d+ more symbols", screen)


def test_price_highlight_and_arrow_follow_the_last_move() -> None:
    from sowcli.ui.dash import _price_cell

    cell = PriceCell(quote("BTCUSDT", "SPOT", 100.0), NOW)
    assert _price_cell(cell, NOW).plain.endswith("→")  # nothing to compare with yet
    cell.update(quote("BTCUSDT", "SPOT", 101.0), NOW)
    fresh = _price_cell(cell, NOW + HIGHLIGHT_S / 2)
    assert fresh.plain == "101.0000 ↗" and "reverse" in str(fresh.style)
    later = _price_cell(cell, NOW + HIGHLIGHT_S + 0.1)
    assert later.plain == "101.0000 ↗" and "reverse" not in str(later.style)
    assert _price_cell(cell, NOW + TREND_HOLD_S + 0.1).plain.endswith("→")
    cell.update(quote("BTCUSDT", "SPOT", 101.0), NOW + 1)  # same price: no new move
    assert cell.moved_at == NOW
    cell.update(quote("BTCUSDT", "SPOT", 99.0), NOW + 2)
    assert _price_cell(cell, NOW + 2.1).plain.endswith("↘")


def test_colours_when_enabled() -> None:
    console = Console(width=160, file=io.StringIO(), color_system="standard", force_terminal=True)
    console.print(render(fixed_state(), NOW, DashOptions(), width=160, height=40))
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert "\x1b[32m+1.23%" in out  # green gain
    assert "\x1b[31m-2.50%" in out  # red loss
    assert "\x1b[1;7" in out  # the highlighted (bold reverse) price that just moved


def test_waiting_and_unreachable_screens() -> None:
    st = DashState.new(DashOptions(symbols=("BTCUSDT",)), "nats://127.0.0.1:1", NOW)
    st.link.attempts = 3
    st.link.set("unreachable", NOW + 1, "Connect call failed ('127.0.0.1', 1)")
    screen = text_of(
        render(st, NOW + 20, DashOptions(symbols=("BTCUSDT",)), width=120, height=30), 120
    )
    assert "🔴 nats unreachable" in screen
    assert "NATS at nats://127.0.0.1:1 is unreachable, retrying for 19s: Connect call" in screen
    # silence proves nothing while our own link is down: expected components wait, not down
    assert "🟡 cache waiting" in screen and "🔴 cache" not in screen
    assert "BTCUSDT" in screen and "1 symbol ·" in screen  # the row asked for, before any quote


def test_no_quotes_yet_says_what_it_waits_for() -> None:
    options = DashOptions(market="SPOT")
    st = DashState.new(options, "nats://x:4222", NOW)
    st.link.set("connected", NOW)
    screen = text_of(render(st, NOW + 1, options, width=100, height=30), 100)
    assert "waiting for quotes on quotes.spot.*" in screen


# --- thresholds -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("age", "expected"),
    [(0.0, "fresh"), (2.9, "fresh"), (3.0, "fresh"), (3.01, "stale"), (10.0, "stale"),
     (10.01, "down"), (3600.0, "down")],
)  # fmt: skip
def test_age_thresholds_at_a_one_second_interval(age: float, expected: str) -> None:
    assert (FRESH_BEATS, DOWN_BEATS) == (3.0, 10.0)
    assert age_health(age, Thresholds(1.0)) == expected


def test_thresholds_scale_with_the_interval_and_a_heartbeat_may_announce_its_own() -> None:
    t = Thresholds(0.2)
    assert (t.fresh_s, t.down_s) == pytest.approx((0.6, 2.0))
    assert age_health(0.7, t) == "stale" and age_health(2.1, t) == "down"
    slow = t.for_doc({"interval_s": 5})
    assert age_health(14.0, slow) == "fresh" and age_health(49.0, slow) == "stale"
    assert t.for_doc({"interval_s": "5"}) is t and t.for_doc({"interval_s": True}) is t


@pytest.mark.parametrize(
    ("state", "expected"),
    [("running", "fresh"), ("connected", "fresh"), ("listening", "fresh"), (None, "fresh"),
     ("reconnecting", "stale"), ("connecting", "stale"), ("degraded", "stale"),
     ("starting", "stale"), ("waiting_questdb", "stale"), ("stopped", "down"), ("down", "down"),
     ("FAILED", "down")],
)  # fmt: skip
def test_reported_states(state: str | None, expected: str) -> None:
    assert state_health(state) == expected


def test_judge_takes_the_worse_and_explains() -> None:
    t = Thresholds(1.0)
    assert judge({"state": "running"}, 1.0, t) == ("fresh", "")
    assert judge({"state": "degraded"}, 1.0, t) == ("stale", "degraded")
    assert judge({"state": "running"}, 5.0, t) == ("stale", "silent 5.0s")
    assert judge({"state": "running"}, 42.0, t) == ("down", "silent 42s")
    assert judge({"state": "stopped"}, 0.1, t) == ("down", "stopped")
    assert judge({"state": "running"}, 42.0, t, link_up=False) == ("stale", "silent 42s")
    assert judge({"state": "running"}, 0.1, t, state="reconnecting") == ("stale", "reconnecting")


def chips_of(st: DashState, now: float) -> dict[str, tuple[str, str]]:
    return {c.label: (c.health, c.detail) for c in component_chips(st, now, DashOptions())}


def test_publisher_is_judged_per_market_from_its_socket_state() -> None:
    st = DashState.new(DashOptions(), "nats://x", NOW)
    st.link.set("connected", NOW)
    doc = dict(PUBLISHER, simulated=False, source="bybit")
    doc["markets"] = {
        "SPOT": {"state": "connected", "url": "wss://spot"},
        "FUTURES": {"state": "reconnecting", "url": "wss://linear"},
    }
    st.components.add("publisher", doc, NOW)
    chips = chips_of(st, NOW + 0.5)
    assert chips["publisher/spot"] == ("fresh", "")
    assert chips["publisher/futures"] == ("stale", "reconnecting")
    c = counters(st, NOW + 0.5, DashOptions())
    assert (c.sockets, c.sockets_total, c.simulated) == (1, 2, False)
    # the publisher goes silent: stale after 3 intervals, down after 10
    assert chips_of(st, NOW + 5)["publisher/spot"] == ("stale", "silent 5.0s")
    assert chips_of(st, NOW + 11)["publisher/spot"] == ("down", "silent 11s")
    assert counters(st, NOW + 11, DashOptions()).sockets_total == 0  # a dead one no longer counts


def test_expected_components_wait_then_are_down() -> None:
    st = DashState.new(DashOptions(), "nats://x", NOW)
    st.link.set("connected", NOW)
    assert chips_of(st, NOW + DOWN_BEATS - 1)["persist"] == ("stale", "waiting")
    assert chips_of(st, NOW + DOWN_BEATS + 1)["persist"] == ("down", "no heartbeat")
    assert "api" not in chips_of(st, NOW)  # optional components appear when heard of
    st.components.add("api", {"component": "api", "state": "running", "clients": 2}, NOW + 1)
    assert chips_of(st, NOW + 2)["api"] == ("fresh", "")
    assert counters(st, NOW + 2, DashOptions()).clients == 2


def test_instances_of_one_component_are_aggregated_and_stopped_ones_forgotten() -> None:
    board = ComponentBoard(NOW)
    board.add("cache", {"instance": "a", "state": "running"}, NOW)
    board.add("cache", {"instance": "b", "state": "running"}, NOW)
    st = DashState(QuoteBoard(), board, DashState.new(DashOptions(), "x", NOW).link)
    st.link.set("connected", NOW)
    assert chips_of(st, NOW + 1)["cache×2"] == ("fresh", "")
    board.add("cache", {"instance": "a", "state": "running"}, NOW + 5)
    assert chips_of(st, NOW + 5.5)["cache×2"] == ("stale", "1 up")  # b silent for 5.5 s
    board.add("cache", {"instance": "b", "state": "stopped"}, NOW + 6)
    board.add("cache", {"instance": "a", "state": "running"}, NOW + 6)
    assert chips_of(st, NOW + 6.5)["cache"] == ("fresh", "")  # b stopped cleanly: forgotten


# --- state ----------------------------------------------------------------------------------------


def test_state_is_bounded_and_filtered_whatever_the_message_rate() -> None:
    board = QuoteBoard(("BTCUSDT",), "SPOT")
    for i in range(20_000):
        board.add(quote("BTCUSDT", "SPOT", 100.0 + i % 7), NOW + i / 10_000)
        board.add(quote("BTCUSDT", "FUTURES", 100.0), NOW + i / 10_000)
        board.add(quote("ETHUSDT", "SPOT", 100.0), NOW + i / 10_000)
    assert list(board.rows) == ["BTCUSDT"] and board.rows["BTCUSDT"].futures is None
    assert (board.received, board.ignored) == (20_000, 40_000)
    capped = QuoteBoard(max_rows=2)
    for s in ("AUSDT", "BUSDT", "CUSDT"):
        capped.add(quote(s, "SPOT", 1.0), NOW)
    assert list(capped.rows) == ["AUSDT", "BUSDT"]


def test_rate_meter_counts_whole_seconds() -> None:
    meter = RateMeter(window_s=5)
    assert meter.rate(NOW) == 0.0
    for i in range(100):  # 10 per second for 10 s
        meter.add(NOW + i / 10)
    assert meter.rate(NOW + 10) == pytest.approx(10.0)
    assert meter.rate(NOW + 30) == 0.0


def test_formatters() -> None:
    assert [fmt_compact(v) for v in (None, 1.5, 950, 12_345, 4.5e8, 1.234e9, 123.4e9)] == [
        "-", "1.50", "950", "12.35K", "450.0M", "1.23B", "123.4B",
    ]  # fmt: skip
    assert [fmt_age(v) for v in (None, -1, 0.25, 12.4, 125, 7300, 200_000)] == [
        "-", "0.0s", "0.2s", "12s", "2m", "2h", "2d",
    ]  # fmt: skip


def test_options_are_validated() -> None:
    s = Settings()
    o = make_options(s, symbols=["btcusdt", "ETHUSDT", "BTCUSDT"], market="Futures", sort="Basis")
    assert (o.symbols, o.market, o.sort, o.fps) == (("BTCUSDT", "ETHUSDT"), "FUTURES", "basis", 4.0)
    assert quote_subjects(o) == ["quotes.futures.BTCUSDT", "quotes.futures.ETHUSDT"]
    assert quote_subjects(DashOptions()) == ["quotes.>"]
    assert quote_subjects(DashOptions(symbols=("XUSDT",))) == ["quotes.*.XUSDT"]
    for bad, flag in (({"market": "options"}, "--market"), ({"sort": "price"}, "--sort"),
                      ({"fps": 0.0}, "--fps")):  # fmt: skip
        with pytest.raises(UsageError, match=flag):
            make_options(s, **bad)


# --- CLI wiring -----------------------------------------------------------------------------------


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command("dash", epilog=dash_cli.EPILOG)(dash_cli.command)

    @app.command("noop")
    def _noop() -> None:  # a second command keeps `dash` a subcommand
        pass

    return app


def test_cli_help_has_examples() -> None:
    result = CliRunner().invoke(_cli(), ["dash", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for text in ("--symbols", "--market", "--sort", "--fps", "--no-color", "--nats-url",
                 "--config", "Examples", "sow dash"):  # fmt: skip
        assert text in result.output


def test_cli_passes_flags_to_the_dashboard(monkeypatch: pytest.MonkeyPatch) -> None:
    import sowcli.runtime
    import sowcli.ui.dash

    seen: dict[str, Any] = {}

    async def fake_dash(settings: Settings, options: DashOptions, **kw: Any) -> None:
        seen.update(settings=settings, options=options, **kw)

    monkeypatch.setattr(sowcli.ui.dash, "run_dash", fake_dash)
    monkeypatch.setattr(
        sowcli.runtime, "run_until_signal", lambda main: asyncio.run(main(asyncio.Event()))
    )
    args = ["dash", "--symbols", "BTCUSDT,ETHUSDT", "--market", "spot", "--sort", "volume",
            "--fps", "2", "--no-color", "--nats-url", "nats://bus:4222"]  # fmt: skip
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 0, result.output
    o: DashOptions = seen["options"]
    assert (o.symbols, o.market, o.sort, o.fps) == (("BTCUSDT", "ETHUSDT"), "SPOT", "volume", 2.0)
    assert seen["settings"].nats_url == "nats://bus:4222"
    assert seen["console"].no_color is True
    result = CliRunner().invoke(_cli(), ["dash"], env={"NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    assert seen["console"].no_color is True and seen["options"].symbols == ()  # all symbols
    result = CliRunner().invoke(_cli(), ["dash"], env={"NO_COLOR": ""})
    assert seen["console"].no_color is False
    result = CliRunner().invoke(_cli(), ["dash", "--sort", "price"])
    assert isinstance(result.exception, UsageError)


# --- against a real nats-server -------------------------------------------------------------------


async def until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_unreachable_nats_is_shown_and_retried_until_it_is_back(
    fresh_nats_server: ServerProcess,
) -> None:
    server = fresh_nats_server
    server.stop()
    options = DashOptions(symbols=("BTCUSDT",), thresholds=Thresholds(0.2))
    st = DashState.new(options, server.nats_url, time.time())
    feed = DashFeed(st, options)
    task = asyncio.create_task(feed.run())
    try:
        await until(lambda: st.link.state == "unreachable" and st.link.attempts >= 2)
        screen = text_of(render(st, time.time(), options, width=120, height=30), 120)
        assert "🔴 nats unreachable" in screen and f"NATS at {server.nats_url}" in screen
        # the reason from the OS, not just nats-py's "no servers available"
        assert "Connect call failed" in st.link.error or "refused" in st.link.error

        await asyncio.to_thread(server.restart)
        await until(lambda: st.link.up)
        nc = await nats.connect(server.nats_url)
        try:
            await until_published(nc, st, "BTCUSDT", 123.5)
            # the server goes away mid-session: reconnecting, then back
            await asyncio.to_thread(server.stop)
            await until(lambda: st.link.state == "reconnecting")
            screen = text_of(render(st, time.time(), options, width=120, height=30), 120)
            assert "🟡 nats reconnecting" in screen and "BTCUSDT" in screen
            await asyncio.to_thread(server.restart)
            await until(lambda: st.link.up)
            await until_published(nc, st, "BTCUSDT", 124.5)
        finally:
            await nc.close()
        assert not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await feed.close()


async def until_published(nc: Any, st: DashState, symbol: str, price: float) -> None:
    """Publish until the dashboard has the price (the subscription may still be on its way)."""
    q = quote(symbol, "SPOT", price)
    payload = encode_quote(q)
    async with asyncio.timeout(15):
        while True:
            row = st.quotes.rows.get(symbol)
            if row is not None and row.spot is not None and row.spot.quote.price == price:
                return
            with contextlib.suppress(Exception):
                await nc.publish(f"quotes.spot.{symbol}", payload)
                await nc.publish("sow.status.cache", b'{"state": "running"}')
            await asyncio.sleep(0.05)


async def test_feed_counts_payloads_that_are_not_quotes(nats_server: ServerProcess) -> None:
    options = DashOptions(symbols=("ZZTESTUSDT",))
    st = DashState.new(options, nats_server.nats_url, time.time())
    feed = DashFeed(st, options)
    task = asyncio.create_task(feed.run())
    nc = await nats.connect(nats_server.nats_url)
    try:
        await until(lambda: st.link.up)
        async with asyncio.timeout(15):
            while st.invalid < 2:
                await nc.publish("quotes.spot.ZZTESTUSDT", b"not json")
                await nc.publish("sow.status.zztest", b"{broken")
                await asyncio.sleep(0.05)
        assert "ZZTESTUSDT" in st.quotes.rows and st.quotes.rows["ZZTESTUSDT"].spot is None
    finally:
        await nc.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await feed.close()


# --- end to end in a pseudo-terminal --------------------------------------------------------------


def dash_argv(*args: str) -> list[str]:
    """``python -m sowcli dash ...`` once the command is registered, else the command itself."""
    from sowcli.cli import app

    group = typer.main.get_command(app)
    if "dash" in getattr(group, "commands", {}):
        return [sys.executable, "-m", "sowcli", "dash", *args]
    runner = "import typer; from sowcli.cli.dash import command; typer.run(command)"
    return [sys.executable, "-c", runner, *args]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SOW_", "NATS_", "TMUX"))}
    env.pop("NO_COLOR", None)
    env.update(LANG="C.UTF-8", LC_ALL="C.UTF-8", PYTHONIOENCODING="utf-8", **extra)
    return env


class Tmux:
    """A private tmux server (own socket, no user config) with one session."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.socket = f"sow-dash-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.conf = tmp / "tmux.conf"
        self.conf.write_text("set -g history-limit 100\n")
        self.env = env

    def __call__(self, *args: str) -> str:
        cmd = ["tmux", "-u", "-L", self.socket, "-f", str(self.conf), *args]
        return subprocess.run(
            cmd, capture_output=True, text=True, check=True, env=self.env, timeout=10
        ).stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "dash")

    def wait_screen(self, predicate: Callable[[str], bool], timeout: float = 40.0) -> str:
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if predicate(screen):
                return screen
            time.sleep(0.1)
        raise AssertionError(f"the screen never matched; last screen:\n{screen}")

    def pane(self, fmt: str) -> str:
        return self("display-message", "-p", "-t", "dash", fmt).strip()

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self("kill-server")


@pytest.fixture
def publisher(nats_server: ServerProcess, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``sow publish --source simulate`` in a subprocess (stopped with SIGTERM afterwards)."""
    log = (tmp_path / "publish.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sowcli", "publish", "--source", "simulate",
         "--symbols", "BTCUSDT,ETHUSDT"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
        env=clean_env(NATS_URL=nats_server.nats_url, SOW_HEARTBEAT_INTERVAL_SECONDS="0.5"),
    )  # fmt: skip
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.skipif(
    subprocess.run(["which", "tmux"], capture_output=True).returncode != 0,
    reason="tmux is not installed",
)
@pytest.mark.timeout(120)
def test_dash_end_to_end_in_a_terminal(
    nats_server: ServerProcess, publisher: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    env = clean_env(NATS_URL=nats_server.nats_url, SOW_HEARTBEAT_INTERVAL_SECONDS="0.5")
    tmux = Tmux(tmp_path, env)
    argv = dash_argv("--symbols", "BTCUSDT,ETHUSDT", "--fps", "10")
    try:
        # a shell around the dashboard keeps the pane alive, to look at the terminal it leaves
        shell = f'{shlex.join(argv)}; echo "dash exit status $?"; exec sleep 300'
        tmux("new-session", "-d", "-s", "dash", "-x", "120", "-y", "40", "-c", str(tmp_path),
             shell)  # fmt: skip
        price = r"[\d,]+\.\d{2,6} [↗↘→]"
        screen = tmux.wait_screen(
            lambda s: all(
                (
                    re.search(rf"^BTCUSDT\s+{price}\s+{price}", s, re.M),
                    re.search(rf"^ETHUSDT\s+{price}\s+{price}", s, re.M),
                    "🟢 nats" in s,
                    "🟢 publisher/spot" in s,
                    "🟢 publisher/futures" in s,
                    "SIMULATED DATA" in s,
                    "persist" in s,
                )
            )
        )
        assert "Traceback" not in screen
        assert tmux.pane("#{alternate_on} #{cursor_flag}") == "1 0"  # full screen, no cursor

        tmux("send-keys", "-t", "dash", "C-c")
        after = tmux.wait_screen(lambda s: "dash exit status" in s, timeout=20)
        assert "dash exit status 0" in after, after
        # restored: back on the normal screen with the cursor visible, the dashboard gone
        assert tmux.pane("#{alternate_on} #{cursor_flag}") == "0 1"
        assert "BTCUSDT" not in after and "Traceback" not in after
    finally:
        tmux.kill()
    assert publisher.poll() is None, "the publisher died during the test"
