"""Bare Bybit -> NATS relays: the reference points of ``bench_publish.py``.

Each relay subscribes to ``tickers.{SYMBOL}`` on one Bybit v5 linear websocket and, per data
frame, does only ``orjson.loads`` + ``orjson.dumps`` + a NATS publish to
``{prefix}.{SYMBOL}`` — no snapshot/delta merge, no validation, no Quote. The frame gets one extra
key, ``recv_us`` (wall clock µs taken when the frame came off the socket), so the benchmark can
measure socket-read -> subscriber latency the same way as for sow's Quote.

Two clients:

- ``websockets``: ``await ws.recv()`` + ``await nc.publish()`` per message — the obvious relay
  anyone would write (one coroutine round trip per frame);
- ``picows``: a Cython websocket client that hands frames to a plain callback; publishes are
  queued and one task drains them in a loop with one ``await nc.publish`` each (the shape sow's
  listener and publisher had before they moved to the socket callback and batched writes).

Usage (normally started by ``bench_publish.py``)::

    python benchmarks/relay_bare.py --client picows --url ws://127.0.0.1:PORT/v5/public/linear \
        --nats nats://127.0.0.1:4222 --symbols BTCUSDT,ETHUSDT
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import orjson

BUFFER_MAX = 100_000  # messages held for NATS by the picows relay (sow's publish_buffer default)


def _subscribe_request(symbols: list[str]) -> bytes:
    return orjson.dumps(
        {"op": "subscribe", "req_id": "bench", "args": [f"tickers.{s}" for s in symbols]}
    )


async def _connect_nats(url: str, name: str) -> Any:
    return await nats.connect(
        url, name=name, pending_size=8 * 1024 * 1024, max_reconnect_attempts=-1
    )


async def relay_websockets(
    url: str, nats_url: str, symbols: list[str], prefix: str, stop: asyncio.Event
) -> None:
    """recv -> loads -> dumps -> ``await nc.publish`` for every frame."""
    from websockets.asyncio.client import connect

    nc = await _connect_nats(nats_url, "bench-relay-websockets")
    loads, dumps, publish = orjson.loads, orjson.dumps, nc.publish
    subject_prefix = prefix + "."

    async def pump() -> None:
        async with connect(url, max_size=None, compression=None, ping_interval=None) as ws:
            await ws.send(_subscribe_request(symbols).decode())
            while True:
                raw = await ws.recv(decode=False)
                recv_us = time.time_ns() // 1000
                msg = loads(raw)
                topic = msg.get("topic")
                if topic is None:  # subscribe ack, pong
                    continue
                msg["recv_us"] = recv_us
                await publish(subject_prefix + topic[8:], dumps(msg))

    task = asyncio.create_task(pump())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    await nc.drain()


async def relay_picows(
    url: str, nats_url: str, symbols: list[str], prefix: str, stop: asyncio.Event
) -> None:
    """picows callback -> loads -> dumps -> queue; one task drains the queue into ``nc.publish``."""
    from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

    nc = await _connect_nats(nats_url, "bench-relay-picows")
    buf: deque[tuple[str, bytes]] = deque()
    wake = asyncio.Event()
    closed = asyncio.Event()
    loads, dumps = orjson.loads, orjson.dumps
    subject_prefix = prefix + "."
    text = WSMsgType.TEXT

    class Listener(WSListener):  # type: ignore[misc]
        def on_ws_connected(self, transport: WSTransport) -> None:
            transport.send(text, _subscribe_request(symbols))

        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            recv_us = time.time_ns() // 1000
            if frame.msg_type != text:
                if frame.msg_type == WSMsgType.CLOSE:
                    transport.disconnect()
                return
            msg = loads(frame.get_payload_as_memoryview())
            topic = msg.get("topic")
            if topic is None:
                return
            msg["recv_us"] = recv_us
            if len(buf) >= BUFFER_MAX:  # bounded like sow's NatsPublisher: drop the oldest
                buf.popleft()
            buf.append((subject_prefix + topic[8:], dumps(msg)))
            wake.set()

        def on_ws_disconnected(self, transport: WSTransport) -> None:
            closed.set()

    async def drain() -> None:
        publish = nc.publish
        while True:
            if not buf:
                wake.clear()
                await wake.wait()
                continue
            n = 0
            while buf and n < 1000:
                subject, payload = buf.popleft()
                await publish(subject, payload)
                n += 1
            if n >= 1000:
                await asyncio.sleep(0)

    transport, _ = await ws_connect(Listener, url, enable_auto_pong=True)
    drainer = asyncio.create_task(drain())
    waiters = {asyncio.create_task(stop.wait()), asyncio.create_task(closed.wait())}
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    transport.disconnect()
    drainer.cancel()
    with contextlib.suppress(BaseException):
        await drainer
    await nc.drain()


RELAYS: dict[str, Callable[..., Awaitable[None]]] = {
    "websockets": relay_websockets,
    "picows": relay_picows,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/relay_bare.py",
        description="A bare Bybit linear tickers -> NATS relay (no normalisation), for benchmarks.",
    )
    parser.add_argument("--client", choices=sorted(RELAYS), required=True)
    parser.add_argument("--url", required=True, help="ws://HOST:PORT/v5/public/linear")
    parser.add_argument("--nats", default="nats://127.0.0.1:4222")
    parser.add_argument("--symbols", required=True, help="comma-separated Bybit symbols")
    parser.add_argument(
        "--prefix", default="bench.relay", help="subject prefix (SYMBOL is appended)"
    )
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args(argv)
    symbols = [s for s in args.symbols.split(",") if s]

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await RELAYS[args.client](args.url, args.nats, symbols, args.prefix, stop)

    if args.no_uvloop:
        asyncio.run(run())
    else:
        import uvloop

        uvloop.run(run())


if __name__ == "__main__":
    main()
