"""The ``subscribe`` stage: print quotes from NATS as they arrive (readable lines or JSON lines)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import IO

import msgspec

from sowcli.bus.nats import connect, quote_filter, subscribe
from sowcli.errors import UsageError
from sowcli.model import Quote, decode_quote


def subject_for(symbol: str | None, market: str | None, subject: str | None) -> str:
    if subject:
        if symbol or market:
            raise UsageError("--subject cannot be combined with SYMBOL or --market")
        return subject
    if market is not None and market.lower() not in ("spot", "futures"):
        raise UsageError(f"--market {market!r}: choose spot or futures")
    if symbol is not None:
        from sowcli.config import SYMBOL_RE

        if not SYMBOL_RE.match(symbol.upper()):
            raise UsageError(f"symbol {symbol!r} is not valid (A-Z and 0-9, 2-30 characters)")
    return quote_filter(symbol, market)


class LinePrinter:
    """One coloured line per quote; the arrow compares with the previous price of the same stream."""

    def __init__(self, out: IO[str], color: bool) -> None:
        from rich.console import Console

        self.console = Console(
            file=out, force_terminal=color, no_color=not color, highlight=False, soft_wrap=True
        )
        self.prev: dict[tuple[str, str], float] = {}

    def __call__(self, q: Quote) -> None:
        from sowcli.ui.format import quote_line

        prev = self.prev.get(q.key)
        self.prev[q.key] = q.price
        self.console.print(quote_line(q, prev))


async def run_subscribe(
    url: str,
    subject: str,
    *,
    as_json: bool = False,
    count: int | None = None,
    stop: asyncio.Event | None = None,
    out: IO[str] | None = None,
    color: bool | None = None,
) -> int:
    """Print quotes on ``subject`` until ``stop`` (or ``count`` quotes); returns how many."""
    out = out or sys.stdout
    stop = stop or asyncio.Event()
    connecting = asyncio.create_task(connect(url, name="sow-subscribe", attempts=3))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not connecting.done():  # Ctrl+C while still connecting
        connecting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await connecting
        return 0
    nc = connecting.result()
    printer = None if as_json else LinePrinter(out, out.isatty() if color is None else color)
    seen = 0

    async def consume() -> None:
        nonlocal seen
        async for msg in subscribe(nc, subject):
            if as_json:
                out.write(msg.data.decode() + "\n")
                out.flush()
            else:
                try:
                    quote = decode_quote(msg.data)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue  # not a Quote (e.g. a raw --subject on other traffic)
                assert printer is not None
                printer(quote)
            seen += 1
            if count is not None and seen >= count:
                return

    task = asyncio.create_task(consume())
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
    finally:
        for t in (task, stopper):
            t.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), timeout=1)
    return seen
