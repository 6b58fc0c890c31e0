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


def fmt_compact(value: float | None) -> str:
    """Large amounts in a few characters: ``1.23B``, ``456.7M``, ``12.3K``, ``950``."""
    if value is None:
        return "-"
    a = abs(value)
    for limit, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if a >= limit:
            scaled = value / limit
            return f"{scaled:.2f}{suffix}" if abs(scaled) < 100 else f"{scaled:.1f}{suffix}"
    return f"{value:.0f}" if a >= 10 else f"{value:.2f}"


def fmt_age(seconds: float | None) -> str:
    """An age in at most five characters: ``0.3s``, ``12s``, ``4m``, ``3h``, ``2d``."""
    if seconds is None:
        return "-"
    s = max(0.0, seconds)
    if s < 10:
        return f"{s:.1f}s"
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{s // 60:.0f}m"
    if s < 86400:
        return f"{s // 3600:.0f}h"
    return f"{s // 86400:.0f}d"
