"""Replay recorded Bybit sessions through the same feed as the live listener.

Reads JSON lines (optionally gzip-compressed, by the ``.gz`` suffix) in the format of
``sow publish --record`` and of ../shared/data/bybit-v5-recording:

- ``{"t":"connect","conn":NAME,"addr":URL}`` — a connection (re)opened: the market is taken from
  the URL path (``/spot`` or ``/linear``) and that market's merge state is reset;
- ``{"t":"recv","conn":NAME,"ts":EPOCH_S,"data":FRAME}`` — a frame as received;
- other lines (``header``, ``http``, ``send``) are skipped.

``speed`` scales the recorded pacing (1 = as recorded, 10 = ten times faster); ``None`` replays as
fast as the feed takes frames. The recorded receive time becomes the Quote's ``recv_us``, so a
replay produces the same quotes every time.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import time
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from sowcli.errors import UsageError
from sowcli.logs import kv
from sowcli.model import Market
from sowcli.sources.feed import Feed

log = logging.getLogger("sow.replay")


class ReplayOrigin:
    """A recorded connection: control frames (acks, pongs) are simply consumed."""

    def __init__(self, market: Market, name: str) -> None:
        self.market: Market = market
        self.name = name
        self.last_data_mono = 0.0
        self.controls = 0

    def on_control(self, msg: dict[str, Any], recv_us: int) -> None:
        self.controls += 1


def _market_of(text: str) -> Market | None:
    low = text.lower()
    if "spot" in low:
        return "SPOT"
    if "linear" in low or "futures" in low:
        return "FUTURES"
    return None


def _open(path: Path) -> IO[bytes]:
    try:
        if path.suffix == ".gz":
            return typing.cast(IO[bytes], gzip.open(path, "rb"))
        return path.open("rb")
    except FileNotFoundError:
        raise UsageError(f"{path}: replay file not found") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot open replay file: {exc.strerror}") from None


def read_events(path: Path) -> Iterator[tuple[str, str, float, bytes]]:
    """(kind, conn, ts_s, data) for every ``connect``/``recv`` line; bad lines are skipped."""
    with _open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                doc = orjson.loads(line)
            except orjson.JSONDecodeError:
                log.warning(
                    "replay: skipped a line that is not JSON", extra=kv(file=str(path), line=lineno)
                )
                continue
            if not isinstance(doc, dict):
                continue
            kind = doc.get("t")
            conn = str(doc.get("conn", ""))
            ts = doc.get("ts")
            ts_s = float(ts) if isinstance(ts, int | float) else 0.0
            if kind == "connect":
                yield "connect", conn, ts_s, str(doc.get("addr", "")).encode()
            elif kind == "recv":
                data = doc.get("data")
                if isinstance(data, str):
                    yield "recv", conn, ts_s, data.encode()


async def replay(path: Path, feed: Feed, *, speed: float | None = None) -> int:
    """Push every recorded frame into ``feed``; returns the number of frames replayed."""
    origins: dict[str, ReplayOrigin] = {}
    first_ts: float | None = None
    started = time.monotonic()
    frames = 0
    for kind, conn, ts_s, data in read_events(path):
        if kind == "connect":
            market = _market_of(data.decode()) or _market_of(conn)
            if market is None:
                continue
            origin = origins[conn] = ReplayOrigin(market, conn)
            feed.connection_reset(origin)
            continue
        origin_or_none = origins.get(conn)
        if origin_or_none is None:
            market = _market_of(conn)
            if market is None:
                continue
            origin_or_none = origins[conn] = ReplayOrigin(market, conn)
        if speed is not None and ts_s:
            if first_ts is None:
                first_ts = ts_s
            due = (ts_s - first_ts) / speed - (time.monotonic() - started)
            if due > 0:
                await asyncio.sleep(due)
        await feed.put(origin_or_none, data, int(ts_s * 1_000_000))
        frames += 1
    await feed.drained()
    log.info("replay finished", extra=kv(file=str(path), frames=frames))
    return frames
