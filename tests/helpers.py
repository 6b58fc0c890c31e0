"""Small helpers shared by the integration tests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from nats.aio.client import Client

from sowcli.bus.nats import quote_subject
from sowcli.model import Quote, encode_quote


async def publish_quotes(nc: Client, quotes: Iterable[Quote], *, pause_every: int = 0) -> None:
    """Publish quotes on their subjects as `sow publish` does, then flush.

    ``pause_every``: flush and pause briefly every N quotes — a steady stream, not one burst.
    """
    for i, q in enumerate(quotes, 1):
        await nc.publish(quote_subject(q.market, q.symbol), encode_quote(q))
        if pause_every and i % pause_every == 0:
            await nc.flush()
            await asyncio.sleep(0.01)
    await nc.flush()
