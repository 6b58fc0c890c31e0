"""JetStream: the ``QUOTES`` stream, the durable ``persist`` consumer and a fast pull loop.

The stream captures ``quotes.>`` on file storage, bounded by age and bytes (oldest dropped first);
:func:`ensure_quotes_stream` creates it or brings an existing one to the configured limits, so
``sow publish`` and ``sow persist`` can both call it at start, in any order, any number of times.

The durable consumer (``persist_consumer``) is shared by every ``sow persist`` process.

Design: pull consumer, cumulative acks made safe for a shared consumer
-----------------------------------------------------------------------
Measured on the 2-core development box with nats-server co-located (nats-py 2.16, uvloop, 300k
pre-filled quotes, five interleaved rounds, median; client CPU in brackets)::

    push + callback, AckAll every 5,000              ~115-150k msg/s  (~190k msg/CPU-s)
    push + deliver group, explicit ack per message   ~ 77k msg/s      (~125k msg/CPU-s)
    pull, raw NEXT requests, explicit ack per msg    ~ 67k msg/s      (~137k msg/CPU-s)
    pull, raw NEXT requests, one AckAll per batch    ~115k msg/s      (~180k msg/CPU-s)
    pull, nats-py ``fetch(5000)``                    ~ 27k msg/s

An explicit ack is one more NATS message per quote for the client *and* the server (which shares
the machine), so per-message acks cost a third of the throughput. ``fetch()`` is slow because of
how nats-py awaits each message with a timeout; sending the pull requests ourselves
(``$JS.API.CONSUMER.MSG.NEXT``) on a callback subscription costs nothing extra.

So the consumer is a **pull** consumer driven by :class:`PullConsumer` (we request only what we can
hold: memory stays bounded, nothing is dropped as a "slow consumer", and a QuestDB outage simply
stops the pulling) with ``ack_policy=all``. AckAll of stream sequence *n* acks every pending
message up to *n*, including messages another ``persist`` process holds and has not written yet,
so it is only sent when it is provably safe (:class:`CumulativeAcks`): a process acks the end of a
*run* of consecutive stream sequences that it has written, and only once every sequence below the
run is acknowledged (the consumer's ack floor, known locally from our own acks or read from the
server). One process alone always satisfies that at once (its batches are consecutive); with
several, a process whose run sits above another's unfinished range waits for that range to be
acked (or redelivered to someone after ``ack_wait``) - correctness never depends on the number
of processes. A sequence that no longer exists in the stream (deleted by hand) counts as acked
once it has been missing for ``ack_wait``.

``ack_wait`` (``persist_ack_wait_seconds``, 30 s) is how long a crashed process's messages wait
before redelivery. A process that retries a QuestDB write sends "in progress" for the messages it
holds every ``ack_wait / 3``, so a long outage causes no redelivery at all, and it stops pulling
when it holds ``4 x persist_batch_rows`` messages. ``max_ack_pending`` (``20 x batch`` = 100k)
caps what all processes together can have unacknowledged, so even a crashed process can cause at
most that many redeliveries per ``ack_wait``. ``max_deliver`` is unlimited: a tick is never given
up on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)

from sowcli.bus.nats import QUOTES_WILDCARD
from sowcli.config import Settings
from sowcli.errors import UpstreamError
from sowcli.logs import kv

log = logging.getLogger("sow.jetstream")

ACK_PREFIX = "$JS.ACK."
STATUS_HEADER = "Status"
PENDING_MSGS_HEADER = "Nats-Pending-Messages"


# --- stream --------------------------------------------------------------------------------


def stream_config(settings: Settings) -> StreamConfig:
    """The ``QUOTES`` stream as configured: ``quotes.>``, file storage, bounded by age and bytes."""
    return StreamConfig(
        name=settings.stream_name,
        description="sow: every Quote published on quotes.> (read by sow persist)",
        subjects=[QUOTES_WILDCARD],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=settings.stream_max_age_hours * 3600.0,
        max_bytes=settings.stream_max_bytes,
    )


def _js(nc_or_js: Client | JetStreamContext) -> JetStreamContext:
    return nc_or_js.jetstream() if isinstance(nc_or_js, Client) else nc_or_js


async def ensure_quotes_stream(
    nc_or_js: Client | JetStreamContext, settings: Settings
) -> StreamInfo:
    """Create the ``QUOTES`` stream, or update an existing one to the configured limits.

    Idempotent and safe to race (``sow publish`` and ``sow persist`` both call it at start).
    Raises :class:`UpstreamError` when JetStream is not enabled or another stream owns
    ``quotes.>``.
    """
    js = _js(nc_or_js)
    wanted = stream_config(settings)
    name = settings.stream_name
    try:
        for _ in range(3):  # create/update races with another process are retried
            try:
                info = await js.stream_info(name)
            except nats.js.errors.NotFoundError:
                try:
                    info = await js.add_stream(wanted)
                except nats.js.errors.BadRequestError as exc:
                    if exc.err_code == 10058:  # created meanwhile by someone else
                        continue
                    raise
                log.info(
                    "jetstream stream created",
                    extra=kv(stream=name, subjects=QUOTES_WILDCARD, max_age_h=settings.stream_max_age_hours,
                             max_bytes=settings.stream_max_bytes),
                )
                return info
            if _stream_differs(info.config, wanted):
                info = await js.update_stream(wanted)
                log.info(
                    "jetstream stream updated",
                    extra=kv(stream=name, max_age_h=settings.stream_max_age_hours,
                             max_bytes=settings.stream_max_bytes),
                )
            return info
        raise UpstreamError(f"JetStream stream {name}: concurrent changes, giving up")
    except nats.js.errors.ServiceUnavailableError:
        raise UpstreamError(
            "JetStream is not enabled on the NATS server (start nats-server with -js)"
        ) from None
    except nats.js.errors.APIError as exc:
        raise UpstreamError(f"JetStream stream {name}: {exc.description or exc}") from None
    except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError):
        raise UpstreamError(
            "JetStream does not answer (is nats-server running with -js?)"
        ) from None


def _stream_differs(have: StreamConfig, wanted: StreamConfig) -> bool:
    def seconds(value: float | None) -> float:
        return round(value or 0.0, 3)

    return (
        sorted(have.subjects or []) != sorted(wanted.subjects or [])
        or seconds(have.max_age) != seconds(wanted.max_age)
        or (have.max_bytes or -1) != (wanted.max_bytes or -1)
        or have.discard != wanted.discard
    )


# --- consumer ------------------------------------------------------------------------------


def consumer_config(settings: Settings, ack_policy: AckPolicy = AckPolicy.ALL) -> ConsumerConfig:
    """The durable pull consumer shared by every ``sow persist`` (see the module docstring)."""
    return ConsumerConfig(
        durable_name=settings.persist_consumer,
        description="sow persist: QUOTES -> QuestDB market_data",
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=ack_policy,
        ack_wait=settings.persist_ack_wait_seconds,
        max_deliver=-1,
        max_ack_pending=20 * settings.persist_batch_rows,
        max_waiting=512,
        filter_subject=QUOTES_WILDCARD,
    )


async def ensure_persist_consumer(
    js: JetStreamContext, settings: Settings, ack_policy: AckPolicy = AckPolicy.ALL
) -> ConsumerInfo:
    """Create the durable consumer or update its limits; returns its info.

    An existing consumer keeps its ack policy (JetStream cannot change it): a consumer created
    with ``explicit`` acks works too, with one ack per message.
    """
    stream, name = settings.stream_name, settings.persist_consumer
    try:
        try:
            have: ConsumerInfo = await js.consumer_info(stream, name)
        except nats.js.errors.NotFoundError:
            info: ConsumerInfo = await js.add_consumer(stream, consumer_config(settings, ack_policy))
            log.info("jetstream consumer created", extra=kv(stream=stream, consumer=name,
                                                           ack_policy=str(ack_policy.value)))
            return info
        if have.config.deliver_subject:
            raise UpstreamError(
                f"JetStream consumer {name} on {stream} is a push consumer; sow persist needs a "
                f"pull consumer: delete it (nats consumer rm {stream} {name}) or set "
                "persist_consumer to another name"
            )
        wanted = consumer_config(settings, have.config.ack_policy or ack_policy)
        if (
            have.config.ack_wait != wanted.ack_wait
            or have.config.max_ack_pending != wanted.max_ack_pending
            or have.config.filter_subject != wanted.filter_subject
        ):
            updated: ConsumerInfo = await js.add_consumer(stream, wanted)  # create-or-update
            log.info("jetstream consumer updated", extra=kv(stream=stream, consumer=name))
            return updated
        return have
    except nats.js.errors.APIError as exc:
        raise UpstreamError(f"JetStream consumer {name} on {stream}: {exc.description or exc}") from None


# --- acks ----------------------------------------------------------------------------------


def stream_seq(reply: str) -> int:
    """The stream sequence of a JetStream message, from its ack subject.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`` (9 tokens), or the
    12-token form with a domain and account hash after ``$JS.ACK``.
    """
    parts = reply.split(".")
    return int(parts[5] if len(parts) == 9 else parts[7])


class Run:
    """Consecutive stream sequences ``start..end``; ``reply`` acks ``end``."""

    __slots__ = ("end", "reply", "start")

    def __init__(self, start: int, end: int, reply: str) -> None:
        self.start, self.end, self.reply = start, end, reply

    def __repr__(self) -> str:
        return f"Run({self.start}..{self.end})"


class RunBuilder:
    """Collects the stream sequences of one batch as runs (cheap: one compare per message)."""

    __slots__ = ("_cur", "runs")

    def __init__(self) -> None:
        self.runs: list[Run] = []
        self._cur: Run | None = None

    def add(self, seq: int, reply: str) -> None:
        cur = self._cur
        if cur is not None and seq == cur.end + 1:
            cur.end = seq
            cur.reply = reply
        else:
            self._cur = cur = Run(seq, seq, reply)
            self.runs.append(cur)


class CumulativeAcks:
    """Decides which AckAll acks are safe on a consumer shared by several processes.

    ``floor``: every stream sequence up to it is known to be acknowledged. A written run
    ``start..end`` may be acked (AckAll ``end``) once ``start <= floor + 1``: everything below
    is acked already and everything from ``start`` to ``end`` is ours and written. Pure logic,
    no I/O: :meth:`add` the runs of a written batch, then send the replies :meth:`ready` returns.
    """

    def __init__(self, floor: int = 0) -> None:
        self.floor = floor
        self._held: list[Run] = []
        self.blocked_since: float | None = None

    @property
    def held(self) -> int:
        """Written messages not yet acked (counting each sequence once)."""
        return sum(r.end - max(r.start, self.floor + 1) + 1 for r in self._held if r.end > self.floor)

    @property
    def first_gap(self) -> int | None:
        """The lowest sequence we wait for (``floor + 1``) when a run is held, else ``None``."""
        return self.floor + 1 if self._held else None

    def add(self, runs: list[Run]) -> None:
        self._held.extend(runs)

    def raise_floor(self, floor: int) -> None:
        if floor > self.floor:
            self.floor = floor

    def ready(self, now: float | None = None) -> list[str]:
        """Replies to send (in order), merging runs; updates ``floor`` as if they were sent."""
        if not self._held:
            self.blocked_since = None
            return []
        self._held.sort(key=lambda r: r.start)
        merged: list[Run] = []
        for run in self._held:
            last = merged[-1] if merged else None
            if last is not None and run.start <= last.end + 1:
                if run.end > last.end:
                    last.end, last.reply = run.end, run.reply
            else:
                merged.append(Run(run.start, run.end, run.reply))
        out: list[str] = []
        while merged and merged[0].start <= self.floor + 1:
            run = merged.pop(0)
            if run.end > self.floor:
                out.append(run.reply)
                self.floor = run.end
        self._held = merged
        if merged:
            if out or self.blocked_since is None:
                self.blocked_since = time.monotonic() if now is None else now
        else:
            self.blocked_since = None
        return out


# --- pull loop -----------------------------------------------------------------------------


@dataclass(slots=True)
class PullStats:
    requests: int = 0
    delivered: int = 0
    status_msgs: int = 0
    resets: int = 0


class PullConsumer:
    """Pulls from a durable consumer with our own ``MSG.NEXT`` requests on a callback inbox.

    ``on_message(msg)`` is called (synchronously, on the event loop) for every data message.
    :meth:`top_up` keeps ``credit`` (requested, not yet received) + ``held()`` at most
    ``max_held``, asking ``batch`` messages at a time, so memory is bounded by what the caller can
    hold. Requests expire after ``expires_s`` and carry an idle heartbeat; when neither messages
    nor heartbeats arrive for a while (server restart, lost requests) or the connection comes
    back, the credit is reset and requests are sent again. Extra deliveries are harmless.
    """

    def __init__(
        self,
        nc: Client,
        stream: str,
        consumer: str,
        on_message: Callable[[Msg], None],
        *,
        batch: int,
        max_held: int,
        held: Callable[[], int],
        expires_s: float = 5.0,
        heartbeat_s: float = 1.0,
        on_consumer_gone: Callable[[], None] | None = None,
    ) -> None:
        self.nc = nc
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.on_message = on_message
        self.batch = batch
        self.max_held = max_held
        self.held = held
        self.expires_s = expires_s
        self.heartbeat_s = heartbeat_s
        self.on_consumer_gone = on_consumer_gone
        self.credit = 0
        self.stats = PullStats()
        self.paused = False
        self._inbox = nc.new_inbox()
        self._request = json.dumps(
            {"batch": batch, "expires": int(expires_s * 1e9), "idle_heartbeat": int(heartbeat_s * 1e9)}
        ).encode()
        self._sub: Subscription | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._last_activity = time.monotonic()
        self._requested_at = 0.0

    async def start(self) -> None:
        # The pending limits only guard against a bug: credit already bounds what can arrive.
        self._sub = await self.nc.subscribe(
            self._inbox, cb=self._on_msg, pending_msgs_limit=4 * self.max_held + 10_000,
            pending_bytes_limit=512 * 1024 * 1024,
        )
        self._watchdog = asyncio.create_task(self._watch(), name="jetstream-pull-watchdog")
        await self.top_up()

    async def stop(self) -> None:
        """Stop requesting, deliver what already arrived, unsubscribe."""
        self.paused = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.drain()  # type: ignore[no-untyped-call]
            self._sub = None

    def reset(self) -> None:
        """Forget outstanding requests (connection back, server restarted, requests lost)."""
        self.credit = 0
        self.stats.resets += 1

    async def top_up(self) -> None:
        if self.paused or not self.nc.is_connected:
            return
        while self.credit + self.held() + self.batch <= self.max_held:
            self.credit += self.batch
            self.stats.requests += 1
            self._requested_at = time.monotonic()
            try:
                await self.nc.publish(self.subject, self._request, reply=self._inbox)
            except (nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError,
                    nats.errors.ConnectionDrainingError):
                self.credit -= self.batch
                return

    async def _on_msg(self, msg: Msg) -> None:
        self._last_activity = time.monotonic()
        if msg.reply:  # a data message: its reply subject is the ack subject
            self.credit -= 1
            self.stats.delivered += 1
            self.on_message(msg)
            if self.credit < self.batch:
                await self.top_up()
            return
        self.stats.status_msgs += 1
        headers = msg.headers or {}
        status = headers.get(STATUS_HEADER, "")
        if status == "100":  # idle heartbeat (or flow control): the request is alive
            return
        pending = headers.get(PENDING_MSGS_HEADER)
        if pending is not None:  # a request ended (expired, ...) with this many not delivered
            with contextlib.suppress(ValueError):
                self.credit -= int(pending)
        elif status in ("404", "408"):
            pass
        else:
            description = headers.get("Description", "")
            log.warning("jetstream pull status", extra=kv(status=status, description=description))
            if status == "409" and "Deleted" in description and self.on_consumer_gone:
                self.on_consumer_gone()
            self.reset()
        self.credit = max(self.credit, 0)
        await self.top_up()

    async def _watch(self) -> None:
        """Re-request when the server went quiet (no message, no heartbeat) or we are idle."""
        quiet_limit = max(3 * self.heartbeat_s, 1.0)
        while True:
            await asyncio.sleep(self.heartbeat_s)
            now = time.monotonic()
            if self.credit > 0 and now - self._last_activity > quiet_limit and (
                now - self._requested_at > quiet_limit
            ):
                log.debug("jetstream pull requests went quiet; re-requesting")
                self.reset()
                self._last_activity = now
            await self.top_up()


async def ack_floor(js: JetStreamContext, stream: str, consumer: str) -> int:
    """The consumer's ack floor (stream sequence): everything up to it is acknowledged."""
    info = await js.consumer_info(stream, consumer, timeout=2.0)
    return int(info.ack_floor.stream_seq) if info.ack_floor else 0


async def missing_from_stream(js: JetStreamContext, stream: str, seq: int) -> bool:
    """True when stream sequence ``seq`` does not exist (deleted, or older than the stream)."""
    try:
        await js.get_msg(stream, seq)
    except nats.js.errors.NotFoundError:
        return True
    except nats.js.errors.APIError as exc:
        return exc.err_code == 10037  # "no message found"
    return False


def consumer_lag(info: ConsumerInfo) -> dict[str, Any]:
    """The lag figures of a heartbeat from a consumer info."""
    return {
        "num_pending": info.num_pending,
        "num_ack_pending": info.num_ack_pending,
        "num_redelivered": info.num_redelivered,
        "num_waiting": info.num_waiting,
        "ack_floor": info.ack_floor.stream_seq if info.ack_floor else 0,
        "delivered": info.delivered.stream_seq if info.delivered else 0,
    }


__all__ = [
    "CumulativeAcks",
    "PullConsumer",
    "Run",
    "RunBuilder",
    "ack_floor",
    "consumer_config",
    "consumer_lag",
    "ensure_persist_consumer",
    "ensure_quotes_stream",
    "missing_from_stream",
    "stream_config",
    "stream_seq",
]
