"""Small formatting pieces shared by the console outputs (``sow subscribe``, ``sow dash``)."""

from __future__ import annotations

from datetime import UTC, datetime

from rich.text import Text

from sowcli.model import Quote


def fmt_price(value: float | None) -> str:
    """Prices with a precision that suits their size (Bybit tick sizes, roughly)."""
    if value is None:
        return "-"
    a = abs(value)
    if a >= 1000:
        return f"{value:,.2f}"
    if a >= 1:
        return f"{value:,.4f}"
    return f"{value:.6f}"


def fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}%"


def trend_arrow(price: float, prev: float | None) -> tuple[str, str]:
    """(arrow, style) against the previous price."""
    if prev is None or price == prev:
        return "→", "dim"
    return ("↗", "green") if price > prev else ("↘", "red")


def quote_line(q: Quote, prev: float | None = None) -> Text:
    ts = datetime.fromtimestamp(q.ts / 1000, tz=UTC).strftime("%H:%M:%S.%f")[:-3]
    arrow, style = trend_arrow(q.price, prev)
    line = Text()
    line.append(ts, "dim")
    line.append(f" {q.market:<7} ", "cyan" if q.market == "SPOT" else "magenta")
    line.append(f"{q.symbol:<10} ", "bold")
    line.append(f"{fmt_price(q.price):>14} {arrow}", style)
    chg = q.change24h
    line.append(
        f" {fmt_pct(chg):>8}", "green" if (chg or 0) > 0 else "red" if (chg or 0) < 0 else "dim"
    )
    if q.bid is not None or q.ask is not None:
        line.append(f"  bid {fmt_price(q.bid)} ask {fmt_price(q.ask)}", "dim")
    if q.volume is not None:
        line.append(f"  vol {q.volume:,.2f}", "dim")
    return line
