"""The live console dashboard behind ``sow dash``: state fed from NATS, drawn by a pure function.

Three parts, so that the screen can be tested without a terminal and without a server:

- :class:`DashState` is what the dashboard knows: the latest quote per symbol and market
  (:class:`QuoteBoard`), the latest heartbeat of every ``sow.status.*`` component
  (:class:`ComponentBoard`) and its own NATS connection (:class:`LinkState`). A NATS message costs
  O(1): one decode, one dict lookup, a few assignments. Nothing is drawn per message.
- :func:`render` turns a state, ``now``, the options and the terminal size into a Rich renderable.
  It is pure (same input, same screen) and runs on a timer (``--fps``, default 4) from the latest
  state only, so a redraw costs what the rows on screen cost, whatever the message rate.
- :func:`run_dash` is the I/O: it connects (retrying for ever and saying so on screen), subscribes,
  and redraws inside a full-screen ``rich.live.Live`` until ``stop`` is set; leaving the ``Live``
  restores the terminal.

**Health** (the header's 🟢 / 🟡 / 🔴) is decided in one place, :func:`judge`, from two inputs:

- the age of the last heartbeat, measured on the dashboard's clock when it arrived (so clock skew
  between machines does not matter), against the heartbeat interval (``interval_s`` in the
  heartbeat when a component sends it, else ``heartbeat_interval_seconds`` from the settings):
  **fresh** while younger than :data:`FRESH_BEATS` intervals, **stale** up to :data:`DOWN_BEATS`
  intervals, **down** beyond (1 s interval: fresh < 3 s, stale 3–10 s, down > 10 s);
- the ``state`` the component reports (for the publisher: the state of each market's exchange
  socket): :data:`DOWN_STATES` are down, :data:`STALE_STATES` (reconnecting, degraded...) and
  states starting with :data:`STALE_PREFIXES` (``waiting_questdb``) are stale, anything else
  (running, connected, or a state this dashboard does not know yet) is fresh.

The worse of the two wins. The publisher, cache and persist are expected: until one has been
heard of, it shows 🟡 "waiting" for :data:`DOWN_BEATS` intervals after the dashboard started, then
🔴 "no heartbeat". Other components (api, ws, ...) appear when their first heartbeat arrives.
While the dashboard's own NATS connection is down, no heartbeat can arrive, so silence says
nothing: components are shown 🟡 at worst until the connection is back.

**Rows**: one per symbol. The 24 h change, high, low and volume come from SPOT when the symbol
streams there, else from FUTURES (or from the ``--market`` chosen). Volume is the 24 h *quote*
volume (USDT turnover), so that symbols compare. The trend arrow shows the direction of the last
price move for :data:`TREND_HOLD_S` seconds (→ otherwise), and the price is highlighted for
:data:`HIGHLIGHT_S` seconds after it moved. The age is the time since the last update of the row.

**Narrow terminals**: columns are dropped in :data:`DROP_ORDER` until the table fits the width;
the symbol and the price columns always stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import orjson
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from sowcli.model import Market, Quote, decode_quote
from sowcli.ui.format import fmt_age, fmt_compact, fmt_pct, fmt_price, trend_arrow

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from rich.console import Console

    from sowcli.config import Settings

log = logging.getLogger("sow.dash")

Health = Literal["fresh", "stale", "down"]
SortKey = Literal["change", "symbol", "volume", "basis"]
SORT_KEYS: tuple[SortKey, ...] = ("change", "symbol", "volume", "basis")

# --- thresholds (documented in the module docstring; tested in tests/test_dash.py) ------------
FRESH_BEATS = 3.0
"""A heartbeat younger than this many intervals is fresh."""
DOWN_BEATS = 10.0
"""No heartbeat for more than this many intervals: down (between the two: stale)."""
DOWN_STATES = frozenset({"stopped", "down", "failed", "error", "closed", "unreachable"})
STALE_STATES = frozenset(
    {"starting", "connecting", "reconnecting", "degraded", "stopping", "draining", "waiting"}
)
STALE_PREFIXES = ("waiting", "degraded", "reconnecting")  # e.g. persist's "waiting_questdb"
EXPECTED_COMPONENTS = ("publisher", "cache", "persist")
HIGHLIGHT_S = 0.75
"""A price is highlighted this long after it moved."""
TREND_HOLD_S = 5.0
"""The arrow shows the last move this long, then → (no move)."""
FORGET_INSTANCE_S = 300.0
"""A silent instance of a component is forgotten after this long when another one reports."""

MARKS: dict[Health, str] = {"fresh": "🟢", "stale": "🟡", "down": "🔴"}
_RANK: dict[Health, int] = {"fresh": 0, "stale": 1, "down": 2}
_HEALTH_STYLE: dict[Health, str] = {"fresh": "green", "stale": "yellow", "down": "bold red"}

# Counters summed over the heartbeats for the header's "dropped".
DROP_COUNTERS = ("dropped", "nats_dropped", "feed_overflow")


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Fresh/stale/down limits for one heartbeat interval (see the module docstring)."""

    interval_s: float = 1.0
    fresh_beats: float = FRESH_BEATS
    down_beats: float = DOWN_BEATS

    @property
    def fresh_s(self) -> float:
        return self.fresh_beats * self.interval_s

    @property
    def down_s(self) -> float:
        return self.down_beats * self.interval_s

    def for_doc(self, doc: dict[str, Any]) -> Thresholds:
        """The thresholds for a heartbeat that announces its own ``interval_s``."""
        interval = doc.get("interval_s")
        if isinstance(interval, int | float) and not isinstance(interval, bool) and interval > 0:
            return Thresholds(float(interval), self.fresh_beats, self.down_beats)
        return self


def age_health(age_s: float, thresholds: Thresholds) -> Health:
    if age_s <= thresholds.fresh_s:
        return "fresh"
    if age_s <= thresholds.down_s:
        return "stale"
    return "down"


def state_health(state: object) -> Health:
    word = str(state).lower() if state is not None else ""
    if word in DOWN_STATES:
        return "down"
    if word in STALE_STATES or word.startswith(STALE_PREFIXES):
        return "stale"
    return "fresh"


def worst(healths: Iterable[Health]) -> Health:
    return max(healths, key=_RANK.__getitem__, default="fresh")


def judge(
    doc: dict[str, Any],
    age_s: float,
    thresholds: Thresholds,
    *,
    state: object = None,
    link_up: bool = True,
) -> tuple[Health, str]:
    """(health, detail) of one heartbeat ``age_s`` old; ``state`` defaults to the doc's.

    The detail is empty when fresh, else what an operator needs: ``silent 12s`` when the
    heartbeats stopped, otherwise the reported state (``reconnecting``, ``degraded``...).
    """
    if state is None:
        state = doc.get("state")
    by_age = age_health(age_s, thresholds.for_doc(doc))
    if by_age == "down" and not link_up:
        by_age = "stale"  # our own connection is down: silence proves nothing
    by_state = state_health(state)
    health = worst((by_age, by_state))
    if health == "fresh":
        return health, ""
    if by_age != "fresh":
        return health, f"silent {fmt_age(age_s)}"
    return health, str(state)


# --- state -------------------------------------------------------------------------------------
class RateMeter:
    """Events per second over the last ``window_s`` whole seconds; O(1) per event."""

    __slots__ = ("_buckets", "_first", "window_s")

    def __init__(self, window_s: int = 5) -> None:
        self.window_s = window_s
        self._buckets: deque[list[int]] = deque(maxlen=window_s + 1)  # [second, count]
        self._first: int | None = None

    def add(self, now: float) -> None:
        sec = int(now)
        buckets = self._buckets
        if buckets and buckets[-1][0] == sec:
            buckets[-1][1] += 1
        else:
            buckets.append([sec, 1])
            if self._first is None:
                self._first = sec

    def rate(self, now: float) -> float:
        if self._first is None:
            return 0.0
        current = int(now)
        span = min(self.window_s, current - self._first)
        if span <= 0:
            return 0.0
        low = current - span
        return sum(c for s, c in self._buckets if low <= s < current) / span


class PriceCell:
    """The latest quote of one symbol on one market, with what the trend arrow needs."""

    __slots__ = ("moved_at", "prev_price", "quote", "received_at")

    def __init__(self, quote: Quote, received_at: float) -> None:
        self.quote = quote
        self.received_at = received_at
        self.prev_price: float | None = None
        self.moved_at = -math.inf

    def update(self, quote: Quote, now: float) -> None:
        if quote.price != self.quote.price:
            self.prev_price = self.quote.price
            self.moved_at = now
        self.quote = quote
        self.received_at = now


class Row:
    """One symbol: its SPOT and FUTURES cells (``None`` until a quote arrives)."""

    __slots__ = ("futures", "spot", "symbol")

    def __init__(self, symbol: str) -> None:
        self.symbol = symbol
        self.spot: PriceCell | None = None
        self.futures: PriceCell | None = None

    def primary(self) -> PriceCell | None:
        """Where the 24 h figures come from: SPOT when present, else FUTURES."""
        return self.spot or self.futures

    def basis_pct(self) -> float | None:
        """(futures − spot) / spot × 100."""
        if self.spot is None or self.futures is None or self.spot.quote.price <= 0:
            return None
        spot = self.spot.quote.price
        return (self.futures.quote.price - spot) / spot * 100

    def received_at(self) -> float | None:
        times = [c.received_at for c in (self.spot, self.futures) if c is not None]
        return max(times) if times else None


class QuoteBoard:
    """The latest quote per (symbol, market); filtered by ``symbols``/``market`` when given."""

    def __init__(
        self, symbols: Sequence[str] = (), market: Market | None = None, max_rows: int = 10_000
    ) -> None:
        self.rows: dict[str, Row] = {s: Row(s) for s in symbols}
        self.only = frozenset(symbols) or None
        self.market = market
        self.max_rows = max_rows
        self.meter = RateMeter()
        self.received = 0
        self.ignored = 0

    def add(self, quote: Quote, now: float) -> None:
        if (self.market is not None and quote.market != self.market) or (
            self.only is not None and quote.symbol not in self.only
        ):
            self.ignored += 1
            return
        row = self.rows.get(quote.symbol)
        if row is None:
            if len(self.rows) >= self.max_rows:
                self.ignored += 1
                return
            row = self.rows[quote.symbol] = Row(quote.symbol)
        if quote.market == "SPOT":
            if row.spot is None:
                row.spot = PriceCell(quote, now)
            else:
                row.spot.update(quote, now)
        elif row.futures is None:
            row.futures = PriceCell(quote, now)
        else:
            row.futures.update(quote, now)
        self.received += 1
        self.meter.add(now)


@dataclass(slots=True)
class Beat:
    doc: dict[str, Any]
    received_at: float


class ComponentBoard:
    """The latest heartbeat of each ``sow.status.{component}``, per instance when it says so."""

    def __init__(self, started_at: float, max_components: int = 64, max_instances: int = 16):
        self.started_at = started_at
        self.max_components = max_components
        self.max_instances = max_instances
        self.beats: dict[str, dict[str, Beat]] = {}

    def add(self, component: str, doc: dict[str, Any], now: float) -> None:
        group = self.beats.get(component)
        if group is None:
            if len(self.beats) >= self.max_components:
                return
            group = self.beats[component] = {}
        instance = str(doc.get("instance") or "")
        group.pop(instance, None)  # re-insert: the dict stays ordered oldest-first
        group[instance] = Beat(doc, now)
        if len(group) > 1:
            for key, beat in list(group.items()):
                if key != instance and (
                    state_health(beat.doc.get("state")) == "down"
                    or now - beat.received_at > FORGET_INSTANCE_S
                ):
                    del group[key]
            while len(group) > self.max_instances:
                del group[next(iter(group))]


@dataclass(slots=True)
class LinkState:
    """The dashboard's own NATS connection."""

    url: str
    state: str = "connecting"  # connecting | connected | reconnecting | unreachable
    since: float = 0.0
    attempts: int = 0
    error: str = ""

    @property
    def up(self) -> bool:
        return self.state == "connected"

    def set(self, state: str, now: float, error: str = "") -> None:
        if state != self.state:
            self.since = now
        self.state = state
        self.error = error


@dataclass(frozen=True, slots=True)
class LogLine:
    ts: float
    level: str
    message: str


@dataclass(slots=True)
class DashState:
    """Everything :func:`render` draws."""

    quotes: QuoteBoard
    components: ComponentBoard
    link: LinkState
    log: deque[LogLine] = field(default_factory=lambda: deque(maxlen=20))
    invalid: int = 0

    @classmethod
    def new(cls, options: DashOptions, url: str, now: float) -> DashState:
        return cls(
            QuoteBoard(options.symbols, options.market),
            ComponentBoard(now),
            LinkState(url, since=now),
        )


# --- options -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DashOptions:
    symbols: tuple[str, ...] = ()  # empty: every symbol on the bus
    market: Market | None = None  # None: both
    sort: SortKey = "change"
    fps: float = 4.0
    stale_after_s: float = 30.0
    thresholds: Thresholds = Thresholds()


def make_options(
    settings: Settings,
    *,
    symbols: Sequence[str] | None = None,
    market: str | None = None,
    sort: str = "change",
    fps: float = 4.0,
) -> DashOptions:
    """Validate the command-line choices (UsageError with the flag's name otherwise)."""
    from sowcli.errors import UsageError
    from sowcli.model import market_name

    try:
        chosen: Market | None = market_name(market) if market else None
    except ValueError:
        raise UsageError(f"--market {market!r}: choose spot or futures") from None
    key = sort.strip().lower()
    if key not in SORT_KEYS:
        raise UsageError(f"--sort {sort!r}: choose one of {', '.join(SORT_KEYS)}")
    if not (0.2 <= fps <= 60):
        raise UsageError(f"--fps {fps}: choose a refresh rate between 0.2 and 60")
    return DashOptions(
        symbols=tuple(dict.fromkeys(s.upper() for s in symbols or ())),
        market=chosen,
        sort=key,
        fps=fps,
        stale_after_s=settings.stale_after_seconds,
        thresholds=Thresholds(settings.heartbeat_interval_seconds),
    )


def quote_subjects(options: DashOptions) -> list[str]:
    """The NATS subjects to subscribe to: only what will be shown."""
    m = options.market.lower() if options.market else "*"
    if options.symbols:
        return [f"quotes.{m}.{s}" for s in options.symbols]
    return ["quotes.>"] if m == "*" else [f"quotes.{m}.*"]


# --- rendering ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Chip:
    """One status in the header: a mark, a label and, when not fresh, why."""

    label: str
    health: Health
    detail: str = ""

    def text(self) -> Text:
        out = Text()
        out.append(MARKS[self.health] + " ")
        out.append(self.label, "bold" if self.health == "fresh" else _HEALTH_STYLE[self.health])
        if self.detail:
            out.append(" " + self.detail, _HEALTH_STYLE[self.health])
        return out


def _aggregate(label: str, judged: list[tuple[Health, str]]) -> Chip:
    if len(judged) == 1:
        return Chip(label, *judged[0])
    healths = [h for h, _ in judged]
    up = sum(h == "fresh" for h in healths)
    label = f"{label}×{len(judged)}"
    if up == len(judged):
        return Chip(label, "fresh")
    return Chip(label, "down" if healths.count("down") == len(healths) else "stale", f"{up} up")


def _markets(options: DashOptions, beats: Iterable[Beat]) -> list[str]:
    if options.market is not None:
        return [options.market]
    seen: dict[str, None] = {}
    for beat in beats:
        markets = beat.doc.get("markets")
        if isinstance(markets, dict):
            seen.update(dict.fromkeys(str(m) for m in markets))
    return list(seen) or ["SPOT", "FUTURES"]


def component_chips(state: DashState, now: float, options: DashOptions) -> list[Chip]:
    """The header's statuses: own NATS, the publisher per market, then every other component."""
    link = state.link
    link_health: Health = "fresh" if link.up else "down" if link.state == "unreachable" else "stale"
    chips = [Chip("nats", link_health, "" if link.up else link.state)]
    t = options.thresholds
    board = state.components
    waited = now - board.started_at
    names = list(EXPECTED_COMPONENTS) + sorted(set(board.beats) - set(EXPECTED_COMPONENTS))
    for name in names:
        group = board.beats.get(name, {})
        if not group:
            if name == "publisher":
                labels = [f"publisher/{m.lower()}" for m in _markets(options, ())]
            else:
                labels = [name]
            if waited <= t.down_s or not link.up:
                chips += [Chip(label, "stale", "waiting") for label in labels]
            else:
                chips += [Chip(label, "down", "no heartbeat") for label in labels]
            continue
        if name != "publisher":
            chips.append(
                _aggregate(
                    name,
                    [judge(b.doc, now - b.received_at, t, link_up=link.up) for b in group.values()],
                )
            )
            continue
        for market in _markets(options, group.values()):
            judged = []
            for b in group.values():
                markets = b.doc.get("markets")
                entry = markets.get(market) if isinstance(markets, dict) else None
                if not isinstance(entry, dict):
                    continue
                judged.append(
                    judge(b.doc, now - b.received_at, t, state=entry.get("state"), link_up=link.up)
                )
            if not judged:
                judged = [("down", "not streaming")]
            chips.append(_aggregate(f"publisher/{market.lower()}", judged))
    return chips


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@dataclass(frozen=True, slots=True)
class Counters:
    quotes_per_s: float
    sockets: int
    sockets_total: int
    clients: int
    dropped: int
    stale: int
    simulated: bool
    source: str


def counters(state: DashState, now: float, options: DashOptions) -> Counters:
    """quotes/s seen here; exchange sockets and API/WS clients, drops and stale streams reported
    by the live components (a component that is down no longer counts)."""
    sockets = sockets_total = clients = dropped = 0
    stale: set[str] = set()
    simulated = False
    source = ""
    t = options.thresholds
    for name, group in state.components.beats.items():
        for beat in group.values():
            doc = beat.doc
            if age_health(now - beat.received_at, t.for_doc(doc)) == "down":
                continue
            dropped += sum(_int(doc.get(k)) for k in DROP_COUNTERS)
            client_count = doc.get("clients")
            if isinstance(client_count, dict):
                clients += sum(_int(v) for v in client_count.values())
            else:
                clients += _int(client_count)
            if name != "publisher":
                continue
            simulated = simulated or doc.get("simulated") is True
            source = str(doc.get("source") or source)
            markets = doc.get("markets")
            for entry in markets.values() if isinstance(markets, dict) else ():
                if isinstance(entry, dict) and entry.get("url"):
                    sockets_total += 1
                    sockets += entry.get("state") == "connected"
            stale_symbols = doc.get("stale_symbols")
            if isinstance(stale_symbols, list):
                stale.update(str(s) for s in stale_symbols)
    limit = options.stale_after_s
    for row in state.quotes.rows.values():
        for cell in (row.spot, row.futures):
            if cell is not None and now - cell.received_at > limit:
                stale.add(f"{cell.quote.market}:{row.symbol}")
    return Counters(
        quotes_per_s=state.quotes.meter.rate(now),
        sockets=sockets,
        sockets_total=sockets_total,
        clients=clients,
        dropped=dropped,
        stale=len(stale),
        simulated=simulated,
        source=source,
    )


@dataclass(frozen=True, slots=True)
class Column:
    key: str
    header: str
    justify: Literal["left", "right"] = "right"


COLUMNS = (
    Column("symbol", "Symbol", "left"),
    Column("spot", "Spot"),
    Column("futures", "Futures"),
    Column("basis", "Basis"),
    Column("change", "24h %"),
    Column("high", "High 24h"),
    Column("low", "Low 24h"),
    Column("volume", "Vol 24h"),
    Column("age", "Age"),
)
DROP_ORDER = ("low", "high", "volume", "age", "basis", "change")
"""Columns dropped first to fit a narrow terminal; symbol and prices always stay."""
COLUMN_GAP = 2  # rich Table(box=None, padding=(0, 1), pad_edge=False): one space each side


def fit_columns(widths: dict[str, int], width: int) -> list[str]:
    """The columns (in display order) that fit ``width``, dropping in :data:`DROP_ORDER`."""
    keep = [c.key for c in COLUMNS if c.key in widths]

    def total() -> int:
        return sum(widths[k] for k in keep) + COLUMN_GAP * (len(keep) - 1)

    for key in DROP_ORDER:
        if total() <= width:
            break
        if key in keep:
            keep.remove(key)
    return keep


def _sort_rows(rows: Iterable[Row], key: SortKey) -> list[Row]:
    by_symbol = sorted(rows, key=lambda r: r.symbol)
    if key == "symbol":
        return by_symbol

    def value(row: Row) -> float | None:
        cell = row.primary()
        if key == "basis":
            return row.basis_pct()
        if cell is None:
            return None
        q = cell.quote
        if key == "change":
            return q.change24h
        if q.turnover is not None:
            return q.turnover
        return None if q.volume is None else q.volume * q.price

    def order(row: Row) -> tuple[bool, float]:
        v = value(row)
        return (v is None, 0.0 if v is None else -v)

    # stable sort: descending by value, unknown values last, ties by symbol
    return sorted(by_symbol, key=order)


def _price_cell(cell: PriceCell | None, now: float) -> Text:
    if cell is None:
        return Text("- ", "dim")
    price = fmt_price(cell.quote.price)
    recent = now - cell.moved_at
    if cell.prev_price is None or recent > TREND_HOLD_S:
        arrow, style = "→", "dim"
    else:
        arrow, style = trend_arrow(cell.quote.price, cell.prev_price)
    if recent <= HIGHLIGHT_S:
        return Text(f"{price} {arrow}", f"bold reverse {style}")
    return Text.assemble(price, " ", (arrow, style))


def _signed(value: float | None, text: str) -> Text:
    style = "dim" if not value else "green" if value > 0 else "red"
    return Text(text, style)


def _cells(row: Row, now: float, options: DashOptions) -> dict[str, Text]:
    primary = row.primary()
    q = primary.quote if primary is not None else None
    basis = row.basis_pct()
    received = row.received_at()
    age = None if received is None else now - received
    turnover = None
    if q is not None:
        turnover = q.turnover if q.turnover is not None else (
            None if q.volume is None else q.volume * q.price
        )  # fmt: skip
    return {
        "symbol": Text(row.symbol, "bold"),
        "spot": _price_cell(row.spot, now),
        "futures": _price_cell(row.futures, now),
        "basis": _signed(basis, "-" if basis is None else f"{basis:+.3f}%"),
        "change": _signed(q.change24h if q else None, fmt_pct(q.change24h if q else None)),
        "high": Text(fmt_price(q.high24h if q else None)),
        "low": Text(fmt_price(q.low24h if q else None)),
        "volume": Text(fmt_compact(turnover)),
        "age": Text(
            fmt_age(age),
            "dim" if age is None or age <= options.stale_after_s else "bold yellow",
        ),
    }


def _pack(chips: Sequence[Text], width: int, gap: str = "  ") -> list[Text]:
    """Chips into as few lines of at most ``width`` cells as possible (never split a chip)."""
    lines: list[Text] = []
    line = Text()
    for chip in chips:
        if line.cell_len and line.cell_len + len(gap) + chip.cell_len > width:
            lines.append(line)
            line = Text()
        if line.cell_len:
            line.append(gap)
        line.append_text(chip)
    if line.cell_len or not lines:
        lines.append(line)
    for text in lines:
        text.truncate(width, overflow="ellipsis")
    return lines


def _link_line(link: LinkState, now: float) -> Text | None:
    waited = fmt_age(now - link.since)
    if link.state == "unreachable":
        return Text(
            f"NATS at {link.url} is unreachable, retrying for {waited}: "
            f"{link.error or 'no answer'}",
            "bold red",
        )
    if link.state == "reconnecting":
        return Text(
            f"lost the connection to NATS at {link.url}; reconnecting for {waited}", "yellow"
        )
    if link.state == "connecting":
        return Text(f"connecting to NATS at {link.url} ...", "yellow")
    return None


def render(
    state: DashState, now: float, options: DashOptions, *, width: int, height: int
) -> RenderableType:
    """The whole screen for a ``width`` × ``height`` terminal (pure: no I/O, no clock)."""
    width = max(width, 20)
    c = counters(state, now, options)
    title = Text(no_wrap=True, overflow="ellipsis")
    title.append("sow dash", "bold cyan")
    title.append(datetime.fromtimestamp(now, tz=UTC).strftime("  %H:%M:%S UTC  "))
    if c.simulated:
        title.append(" SIMULATED DATA ", "bold black on yellow")
        title.append("  ")
    elif c.source.startswith("replay"):
        title.append(" REPLAYED DATA ", "bold black on cyan")
        title.append("  ")
    n = len(state.quotes.rows)
    title.append(f"{n} symbol{'' if n == 1 else 's'} · sort {options.sort}", "dim")

    chip_lines = _pack([chip.text() for chip in component_chips(state, now, options)], width)
    sockets = f"{c.sockets}/{c.sockets_total}" if c.sockets_total else "0"
    count_parts = [
        ("quotes/s", f"{c.quotes_per_s:,.0f}", ""),
        ("exchange sockets", sockets, "" if c.sockets == c.sockets_total else "yellow"),
        ("clients", str(c.clients), ""),
        ("dropped", f"{c.dropped:,}", "bold red" if c.dropped else ""),
        ("stale", str(c.stale), "bold yellow" if c.stale else ""),
    ]
    count_lines = _pack(
        [
            Text.assemble((f"{label} ", "dim"), (value, style))
            for label, value, style in count_parts
        ],
        width,
        gap=" · ",
    )
    top: list[RenderableType] = [title, *chip_lines, *count_lines]
    link_line = _link_line(state.link, now)
    if link_line is not None:
        link_line.truncate(width, overflow="ellipsis")
        top.append(link_line)

    footer = Text(no_wrap=True, overflow="ellipsis")
    footer.append("Ctrl+C to quit", "dim")
    if state.invalid:
        footer.append(f" · {state.invalid:,} payloads were not quotes", "yellow")
    if state.log:
        last = state.log[-1]
        footer.append(f" · {fmt_age(now - last.ts)} ago {last.level}: {last.message}", "yellow")

    rows = _sort_rows(state.quotes.rows.values(), options.sort)
    room = max(1, height - len(top) - 3)  # table header + footer + spare line
    more = 0
    if len(rows) > room:
        more = len(rows) - (room - 1)
        rows = rows[: room - 1]

    body: list[RenderableType] = []
    if not rows:
        subjects = ", ".join(quote_subjects(options))
        body.append(Text(f"waiting for quotes on {subjects} ...", "dim"))
    else:
        cells = [_cells(row, now, options) for row in rows]
        columns = [
            col
            for col in COLUMNS
            if not (options.market == "SPOT" and col.key in ("futures", "basis"))
            and not (options.market == "FUTURES" and col.key in ("spot", "basis"))
        ]
        widths = {
            col.key: max(len(col.header), *(cell[col.key].cell_len for cell in cells))
            for col in columns
        }
        keep = fit_columns(widths, width)
        table = Table(
            box=None,
            padding=(0, 1),
            pad_edge=False,
            show_header=True,
            header_style="bold underline",
            expand=False,
        )
        for col in columns:
            if col.key in keep:
                table.add_column(col.header, justify=col.justify, no_wrap=True)
        for cell in cells:
            table.add_row(*(cell[k] for k in keep))
        body.append(table)
        if more:
            body.append(Text(f"+ {more} more symbols (taller terminal or --symbols)", "dim"))
    return Group(*top, *body, footer)


# --- I/O ---------------------------------------------------------------------------------------
class _RingHandler(logging.Handler):
    """Log records into the dashboard's ring while the screen is up (stderr would tear it)."""

    def __init__(self, ring: deque[LogLine]) -> None:
        super().__init__(logging.WARNING)
        self.ring = ring

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.ring.append(LogLine(record.created, record.levelname.lower(), record.getMessage()))


@contextlib.contextmanager
def _logs_to(ring: deque[LogLine]) -> Iterator[None]:
    root = logging.getLogger()
    saved = list(root.handlers)
    handler = _RingHandler(ring)
    for h in saved:
        root.removeHandler(h)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        for h in saved:
            root.addHandler(h)


async def probe(url: str, timeout_s: float = 2.0) -> str:
    """``""`` when a TCP connection to one of the NATS servers in ``url`` opens, else why not
    (nats-py only says "no servers available"; the operator wants "connection refused")."""
    from urllib.parse import urlsplit

    from sowcli.bus.nats import servers

    reasons: list[str] = []
    for server in servers(url):
        parts = urlsplit(server if "://" in server else f"nats://{server}")
        try:
            host, port = parts.hostname or "localhost", parts.port or 4222
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
        except (OSError, TimeoutError, ValueError) as exc:
            reasons.append(str(exc) or type(exc).__name__)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return ""
    return "; ".join(reasons) or "no server in the URL"


class DashFeed:
    """The dashboard's NATS side: connect (for ever), subscribe, update the state per message."""

    def __init__(
        self,
        state: DashState,
        options: DashOptions,
        *,
        clock: Callable[[], float] = time.time,
        max_pending: int = 65_536,
    ) -> None:
        self.state = state
        self.options = options
        self.clock = clock
        self.max_pending = max_pending
        self.nc: Client | None = None

    async def _on_quote(self, msg: Msg) -> None:
        try:
            quote = decode_quote(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.state.invalid += 1
            return
        self.state.quotes.add(quote, self.clock())

    async def _on_status(self, msg: Msg) -> None:
        from sowcli.bus.nats import STATUS_PREFIX

        try:
            doc = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            self.state.invalid += 1
            return
        if isinstance(doc, dict):
            component = msg.subject.removeprefix(STATUS_PREFIX)
            self.state.components.add(component, doc, self.clock())

    async def _connect(self) -> Client:
        """Connect for ever, with a jittered backoff; each failure's reason goes on screen."""
        from sowcli.bus.nats import connect
        from sowcli.errors import UpstreamError

        link = self.state.link

        async def down() -> None:
            link.set("reconnecting", self.clock())

        async def up() -> None:
            link.set("connected", self.clock())

        delay = 0.2
        while True:
            link.attempts += 1
            try:
                return await connect(
                    link.url, name="sow-dash", on_disconnect=down, on_reconnect=up, attempts=1
                )
            except UpstreamError as exc:
                reason = await probe(link.url) or str(exc).split(" is unreachable: ", 1)[-1]
                link.set("unreachable", self.clock(), reason)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 5.0)

    async def run(self) -> None:
        """Connect, subscribe and keep going until cancelled (nats-py resubscribes on reconnect)."""
        from sowcli.bus.nats import STATUS_PREFIX

        nc = self.nc = await self._connect()
        for subject in quote_subjects(self.options):
            await nc.subscribe(subject, cb=self._on_quote, pending_msgs_limit=self.max_pending)
        await nc.subscribe(STATUS_PREFIX + ">", cb=self._on_status)
        await nc.flush()
        self.state.link.set("connected", self.clock())
        await asyncio.Event().wait()

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), timeout=1.0)


async def run_dash(
    settings: Settings,
    options: DashOptions,
    *,
    stop: asyncio.Event | None = None,
    console: Console | None = None,
    screen: bool = True,
) -> DashState:
    """Show the dashboard until ``stop`` is set; the terminal is restored on the way out."""
    from rich.console import Console
    from rich.live import Live

    stop = stop or asyncio.Event()
    console = console or Console(highlight=False)
    state = DashState.new(options, settings.nats_url, time.time())
    feed = DashFeed(state, options)
    period = 1.0 / options.fps
    with (
        _logs_to(state.log),
        Live(console=console, screen=screen, auto_refresh=False, transient=not screen) as live,
    ):
        task = asyncio.create_task(feed.run(), name="dash-nats")
        try:
            while True:
                size = console.size
                live.update(
                    render(state, time.time(), options, width=size.width, height=size.height),
                    refresh=True,
                )
                if task.done():
                    task.result()  # an unexpected error ends the dashboard, with its message
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), period)
                    break
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            await feed.close()
    return state
