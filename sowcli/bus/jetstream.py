"""JetStream: the ``QUOTES`` stream, the durable ``persist`` consumer and a fast pull loop.

The stream captures ``quotes.>`` on file storage, bounded by age and bytes (oldest dropped first);
:func:`ensure_quotes_stream` creates it or brings an existing one to the configured limits, so
``sow publish`` and ``sow persist`` can both call it at start, in any order, any number of times.

The durable consumer (``persist_consumer``) is shared by every ``sow persist`` process.

Design: pull consumer, explicit acks written in bulk
----------------------------------------------------
Bare consume + ack loops (no decoding, nothing written) measured on the 2-core development box
with nats-server co-located (nats-py 2.16, uvloop). Client CPU per message is the stable figure;
wall rates varied two- to three-fold with the load other work put on the shared box. First
exploration (200-300k quotes, interleaved rounds, medians)::

    push + callback, one AckAll every 5,000           ~115-150k msg/s  (~190k msg/CPU-s)
    push + deliver group, msg.ack() per message        ~ 77k msg/s      (~125k msg/CPU-s)
    pull, own NEXT requests, nc.publish ack per msg    ~ 60k msg/s      (~135k msg/CPU-s)
    pull, own NEXT requests, acks written in bulk      ~ 64k msg/s      (~177k msg/CPU-s)
    pull, own NEXT requests, one AckAll per batch      ~ 75k msg/s      (~188k msg/CPU-s)
    pull, nats-py ``fetch(5000)``                      ~ 27k msg/s

``benchmarks/bench_persist.py`` (500k quotes, 3 runs, medians) repeats the three contenders as
its ceilings: push + AckAll ~171k, pull + AckAll ~166k, pull + bulk explicit acks ~157k msg/CPU-s.

AckAll is the cheapest, but it acknowledges every pending message below the acked one - also
those another ``persist`` process holds and has not written yet: a crash of that process would
then lose them. We tried making AckAll safe (ack a run only when every lower sequence is already
acked): it is correct, but JetStream hands the messages of one consumer to its waiting pull
requests one by one in turn, so with two processes every other message belongs to the other one
and acks could only advance one message per ack-floor check. So acks are **explicit, one per
message** - correct and fully parallel with any number of processes - and :func:`send_acks`
writes a whole batch's acks as one buffer, which brings their client cost close to AckAll's.

On a :class:`sowcli.bus.nats.DirectClient` (what :func:`sowcli.bus.nats.connect` returns) the
data messages skip nats-py's per-message machinery: the protocol parser hands them to
:meth:`PullConsumer._on_data` as bytes (persist CPU per row 9.8 -> 6.5 µs). Status messages
(they carry headers) still take nats-py's path.

The consumer is a **pull** consumer driven by :class:`PullConsumer`: we request only what we can
hold (memory stays bounded, nothing is dropped as a "slow consumer", a QuestDB outage simply stops
the pulling), and several processes share it natively. nats-py's ``fetch()`` is slow because it
awaits each message with a timeout; sending the ``$JS.API.CONSUMER.MSG.NEXT`` requests ourselves on
a callback subscription costs nothing extra.

``ack_wait`` (``persist_ack_wait_seconds``, 30 s) is how long a crashed process's messages wait
before redelivery. A process that retries a QuestDB write sends "in progress" (``+WPI``) for the
messages it holds every ``ack_wait / 3``, so a long outage causes no redelivery at all, and it
stops pulling once it holds ``6 x persist_batch_rows`` messages. ``max_ack_pending``
(``20 x persist_batch_rows`` = 200k) caps what all processes together hold unacknowledged, so a
crash can cause at most that many redeliveries. ``max_deliver`` is unlimited: a tick is never
given up on. Payloads that are not Quotes are terminated (``+TERM``): never redelivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
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

from sowcli.bus.nats import QUOTES_WILDCARD, pub_line, write_lines
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
                    extra=kv(
                        stream=name,
                        subjects=QUOTES_WILDCARD,
                        max_age_h=settings.stream_max_age_hours,
                        max_bytes=settings.stream_max_bytes,
                    ),
                )
                return info
            if _stream_differs(info.config, wanted):
                info = await js.update_stream(wanted)
                log.info(
                    "jetstream stream updated",
                    extra=kv(
                        stream=name,
                        max_age_h=settings.stream_max_age_hours,
                        max_bytes=settings.stream_max_bytes,
                    ),
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


def consumer_config(settings: Settings) -> ConsumerConfig:
    """The durable pull consumer shared by every ``sow persist`` (see the module docstring)."""
    return ConsumerConfig(
        durable_name=settings.persist_consumer,
        description="sow persist: QUOTES -> QuestDB market_data",
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.persist_ack_wait_seconds,
        max_deliver=-1,
        max_ack_pending=20 * settings.persist_batch_rows,
        max_waiting=512,
        filter_subject=QUOTES_WILDCARD,
    )


async def ensure_persist_consumer(js: JetStreamContext, settings: Settings) -> ConsumerInfo:
    """Create the durable consumer or update its limits (ack wait, max ack pending); its info."""
    stream, name = settings.stream_name, settings.persist_consumer
    wanted = consumer_config(settings)
    try:
        try:
            have: ConsumerInfo = await js.consumer_info(stream, name)
        except nats.js.errors.NotFoundError:
            info: ConsumerInfo = await js.add_consumer(stream, wanted)
            log.info("jetstream consumer created", extra=kv(stream=stream, consumer=name))
            return info
        if have.config.deliver_subject or have.config.ack_policy != AckPolicy.EXPLICIT:
            raise UpstreamError(
                f"JetStream consumer {name} on {stream} is not a pull consumer with explicit acks "
                f"(the only kind several sow persist processes can share safely): delete it "
                f"(nats consumer rm {stream} {name}) or set persist_consumer to another name"
            )
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
        raise UpstreamError(
            f"JetStream consumer {name} on {stream}: {exc.description or exc}"
        ) from None


# --- acks ----------------------------------------------------------------------------------

ACK = b""
TERM = b"+TERM"
IN_PROGRESS = b"+WPI"


async def send_acks(nc: Client, replies: Sequence[bytes | str], kind: bytes = ACK) -> None:
    """Send one ack (``ACK``, ``TERM`` or ``IN_PROGRESS``) to each reply subject, in one write.

    Each JetStream message needs its own ack message. ``nc.publish`` per ack costs ~2 µs of
    Python each (a third of a bare consume loop); writing the ``PUB`` lines of a whole batch as
    one buffer costs a tenth of that. The protocol lines are plain NATS ``PUB subject size``
    (no reply, no headers). When the client lacks the internal write call (another nats-py
    version), acks go through ``publish`` one by one: slower, same result.
    """
    if not replies or nc.is_closed:
        return
    await write_lines(nc, [pub_line(reply, kind) for reply in replies])


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
        on_message: Callable[[bytes, bytes, bytes], None],
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
            {
                "batch": batch,
                "expires": int(expires_s * 1e9),
                "idle_heartbeat": int(heartbeat_s * 1e9),
            }
        ).encode()
        self._sub: Subscription | None = None
        self._direct = False
        self._topping: asyncio.Future[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._last_activity = time.monotonic()
        self._requested_at = 0.0

    async def start(self) -> None:
        # The pending limits only guard against a bug: credit already bounds what can arrive.
        self._sub = await self.nc.subscribe(
            self._inbox,
            cb=self._on_msg,
            pending_msgs_limit=4 * self.max_held + 10_000,
            pending_bytes_limit=512 * 1024 * 1024,
        )
        deliver = getattr(self.nc, "deliver_direct", None)  # sowcli.bus.nats.DirectClient
        self._direct = bool(deliver is not None and deliver(self._sub, self._on_data))
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
                await asyncio.wait_for(self._sub.drain(), timeout=5.0)  # type: ignore[no-untyped-call]
            if self._direct:
                self.nc.deliver_direct(self._sub, None)  # type: ignore[attr-defined]
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
            except (
                nats.errors.ConnectionClosedError,
                nats.errors.OutboundBufferLimitError,
                nats.errors.ConnectionDrainingError,
            ):
                self.credit -= self.batch
                return

    def _on_data(self, subject: bytes, reply: bytes, data: bytes) -> None:
        """A data message (its reply subject is the ack subject): the hot path, once per message."""
        if not reply:  # not from JetStream: nothing to ack, nothing it counts against
            return
        self.credit -= 1
        self.stats.delivered += 1
        self.on_message(subject, reply, data)
        if self.credit < self.batch and self.credit + self.held() + self.batch <= self.max_held:
            topping = self._topping
            if topping is None or topping.done():
                self._topping = asyncio.ensure_future(self.top_up())

    async def _on_msg(self, msg: Msg) -> None:
        """nats-py's path: status messages, and data when direct delivery is unavailable."""
        if msg.reply:
            self._on_data(msg.subject.encode(), msg.reply.encode(), msg.data)
            return
        self._last_activity = time.monotonic()
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
        delivered = self.stats.delivered
        while True:
            await asyncio.sleep(self.heartbeat_s)
            now = time.monotonic()
            if self.stats.delivered != delivered:  # data counts as activity (not timed per message)
                delivered = self.stats.delivered
                self._last_activity = now
            if (
                self.credit > 0
                and now - self._last_activity > quiet_limit
                and (now - self._requested_at > quiet_limit)
            ):
                log.debug("jetstream pull requests went quiet; re-requesting")
                self.reset()
                self._last_activity = now
            await self.top_up()


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
    "ACK",
    "IN_PROGRESS",
    "TERM",
    "PullConsumer",
    "consumer_config",
    "consumer_lag",
    "ensure_persist_consumer",
    "ensure_quotes_stream",
    "send_acks",
    "stream_config",
]
