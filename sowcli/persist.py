"""The ``persist`` stage: JetStream ``QUOTES`` -> QuestDB ``market_data``, every tick exactly once.

:func:`run_persist` is what ``sow persist`` calls and what ``sow up`` composes. How it keeps the
promise (ARCHITECTURE.md, "Delivery semantics"):

1. JetStream holds every published quote (stream ``QUOTES``) until a ``persist`` process acks it.
2. Quotes are pulled from the shared durable consumer (:mod:`sowcli.bus.jetstream` says why a
   pull consumer with explicit acks, by measurement), decoded, validated and appended to an ILP
   buffer. A batch is written when it reaches ``persist_batch_rows`` rows or when its first row is
   ``persist_flush_ms`` old; the next batch fills while the previous one is being written.
3. A batch is acked only after QuestDB accepted it (one HTTP request = one transaction). A failed
   write keeps the batch and retries it with capped exponential backoff (tenacity) - nothing is
   acked meanwhile, "in progress" is signalled so JetStream does not redeliver, and pulling stops
   once ``6 x persist_batch_rows`` messages are held (2 lanes). A crash (even ``kill -9``) loses no tick:
   unacked messages are redelivered after ``persist_ack_wait_seconds``; and duplicates none: the
   DEDUP UPSERT keys ``(timestamp, symbol, market, seq)`` make a rewritten row replace itself.
   The row timestamp is the exchange event time ``ts`` from the quote, never the server's clock.
4. A payload that is not a valid Quote is counted, logged, skipped and terminated (``+TERM``)
   with its batch: it could never be written, and redelivering it would only repeat that.
5. On stop the current batch is written and acked, then the connections close. When QuestDB is
   down at that moment the stage gives up after ``SHUTDOWN_GRACE_S`` without acking: the quotes
   stay in JetStream for the next start.

A heartbeat goes to ``sow.status.persist`` every ``heartbeat_interval_seconds``: consumer lag
(``num_pending``, ``num_ack_pending``), rows/s, rows total, last flush time/latency/rows, errors,
invalid payloads and the QuestDB state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import msgspec
import orjson
from nats.aio.client import Client
from nats.js import JetStreamContext
from questdb import QuestDBError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential_jitter

from sowcli.bus.jetstream import (
    IN_PROGRESS,
    TERM,
    PullConsumer,
    consumer_lag,
    ensure_persist_consumer,
    ensure_quotes_stream,
    send_acks,
)
from sowcli.bus.nats import connect, status_subject
from sowcli.config import Settings
from sowcli.errors import UpstreamError
from sowcli.logs import kv
from sowcli.model import decode_quote
from sowcli.sinks.questdb import Buffer, QuestDBWriter, add_quote, ensure_tables

log = logging.getLogger("sow.persist")

COMPONENT = "persist"
SHUTDOWN_GRACE_S = 10.0
WRITE_LANES = 2  # QuestDB requests in flight at a time
MIN_TS_MS = 946_684_800_000  # 2000-01-01: older event times are not Bybit quotes
MAX_TS_MS = 4_102_444_800_000  # 2100-01-01
# a payload that is not a Quote, or a value the ILP row refuses (the row is rolled back)
_QUOTE_ERRORS = (
    msgspec.ValidationError,
    msgspec.DecodeError,
    ValueError,
    OverflowError,
    TypeError,
    QuestDBError,
)


class Batch:
    """Rows on their way to QuestDB and the JetStream messages they came from."""

    __slots__ = ("buffer", "invalid", "replies", "rows", "started")

    def __init__(self, buffer: Buffer) -> None:
        self.buffer = buffer
        self.rows = 0
        self.replies: list[bytes] = []  # acked once the rows are written
        self.invalid: list[bytes] = []  # terminated with the batch
        self.started = time.monotonic()

    @property
    def messages(self) -> int:
        return len(self.replies) + len(self.invalid)


class Persister:
    """The running persist stage (exposed so ``sow up`` and tests can read its counters)."""

    def __init__(
        self, settings: Settings, *, name: str = "sow-persist", lanes: int = WRITE_LANES
    ) -> None:
        self.settings = settings
        self.name = name
        self.batch_rows = settings.persist_batch_rows
        # pull no more once this many messages are held: each lane's batch, as many sealed, one open
        self.max_held = (2 * lanes + 2) * self.batch_rows
        self.flush_s = settings.persist_flush_ms / 1000
        self.started = time.time()
        self.state = "starting"
        self.questdb_state = "unknown"
        # counters
        self.rows_total = 0
        self.messages_total = 0
        self.invalid = 0
        self.flushes = 0
        self.flush_errors = 0
        self.errors = 0
        self.acks_sent = 0
        self.last_error: str | None = None
        self.last_flush_ts: float | None = None
        self.last_flush_ms: float | None = None
        self.last_flush_rows = 0
        self.lag: dict[str, Any] = {}
        self._rate_rows = 0
        self._rate_t = time.monotonic()
        self.rows_per_s = 0.0
        # plumbing
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self.writer = QuestDBWriter(
            settings.questdb_http_url, lanes=lanes, init_buf_rows=self.batch_rows
        )
        self.pull: PullConsumer | None = None
        self._batch: Batch | None = None  # filling
        self._writing: list[Batch] = []  # being written (and retried)
        self._gave_up = False
        self._failure: Exception | None = None
        self._sealed: list[Batch] = []
        self._in_hand = 0  # messages received and not yet written (or given up)
        self._work = asyncio.Event()
        self._draining = False
        self._abandon = asyncio.Event()
        self._last_progress_signal = time.monotonic()
        self._consumer_task: asyncio.Task[None] | None = None

    # --- status ------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The heartbeat document (also what ``sow up`` shows)."""
        return {
            "component": COMPONENT,
            "state": self.state,
            "since": self.started,
            "ts": time.time(),
            "stream": self.settings.stream_name,
            "consumer": self.settings.persist_consumer,
            "questdb": self.questdb_state,
            "nats_connected": bool(self.nc is not None and self.nc.is_connected),
            "rows_total": self.rows_total,
            "rows_per_s": round(self.rows_per_s, 1),
            "messages_total": self.messages_total,
            "invalid": self.invalid,
            "flushes": self.flushes,
            "flush_errors": self.flush_errors,
            "errors": self.errors,
            "last_error": self.last_error,
            "last_flush_ts": self.last_flush_ts,
            "last_flush_ms": self.last_flush_ms,
            "last_flush_rows": self.last_flush_rows,
            "in_hand": self._in_hand,
            "acks_sent": self.acks_sent,
            "lag": dict(self.lag),
        }

    def _update_rate(self) -> None:
        now = time.monotonic()
        dt = now - self._rate_t
        if dt > 0:
            self.rows_per_s = (self.rows_total - self._rate_rows) / dt
        self._rate_rows, self._rate_t = self.rows_total, now

    async def _refresh_lag(self) -> None:
        if self.js is None or self.nc is None or not self.nc.is_connected:
            return
        with contextlib.suppress(Exception):
            info = await self.js.consumer_info(
                self.settings.stream_name, self.settings.persist_consumer, timeout=1.0
            )
            self.lag = consumer_lag(info)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_seconds)
            self._update_rate()
            await self._refresh_lag()
            nc = self.nc
            if nc is not None and nc.is_connected:
                with contextlib.suppress(Exception):
                    await nc.publish(status_subject(COMPONENT), orjson.dumps(self.status()))

    # --- intake (event loop, once per message) ----------------------------------------------
    def _held(self) -> int:
        return self._in_hand

    def _on_message(self, subject: bytes, reply: bytes, data: bytes) -> None:
        batch = self._batch
        if batch is None:
            batch = self._batch = Batch(self.writer.new_buffer())
            self._work.set()  # the flush loop starts this batch's flush_ms clock
        self._in_hand += 1
        try:
            quote = decode_quote(data)
            if not MIN_TS_MS <= quote.ts <= MAX_TS_MS:
                raise ValueError(f"ts {quote.ts} is not an event time in ms")
            add_quote(batch.buffer, quote)
        except _QUOTE_ERRORS as exc:
            batch.invalid.append(reply)
            self.invalid += 1
            if self.invalid <= 10 or self.invalid % 1000 == 0:
                log.warning(
                    "invalid quote payload skipped",
                    extra=kv(
                        subject=subject.decode(errors="replace"),
                        error=str(exc)[:200],
                        invalid_total=self.invalid,
                    ),
                )
        else:
            batch.replies.append(reply)
            batch.rows += 1
        if batch.rows + len(batch.invalid) >= self.batch_rows:
            self._seal()

    def _seal(self) -> None:
        if self._batch is not None:
            self._sealed.append(self._batch)
            self._batch = None
            self._work.set()

    # --- writing -----------------------------------------------------------------------------
    async def _interruptible_sleep(self, seconds: float) -> None:
        """tenacity's sleep: ends early when we give up; keeps held messages from redelivery."""
        deadline = time.monotonic() + seconds
        step = self.settings.persist_ack_wait_seconds / 3
        while not self._abandon.is_set():
            await self._signal_progress()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._abandon.wait(), timeout=min(left, step))

    async def _signal_progress(self) -> None:
        """While a write is retried, tell JetStream the held messages are being worked on."""
        now = time.monotonic()
        if now - self._last_progress_signal < self.settings.persist_ack_wait_seconds / 3:
            return
        self._last_progress_signal = now
        nc = self.nc
        if nc is None or not nc.is_connected:
            return
        batches = [*self._writing, *self._sealed, *([self._batch] if self._batch else [])]
        with contextlib.suppress(Exception):
            for batch in batches:
                await send_acks(nc, batch.replies, IN_PROGRESS)

    def _on_write_error(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        self.flush_errors += 1
        self.errors += 1
        self.questdb_state = "down"
        self.last_error = str(exc)
        wait = state.next_action.sleep if state.next_action else 0.0
        if state.attempt_number <= 3 or state.attempt_number % 20 == 0:
            log.warning(
                "QuestDB write failed; keeping the batch and retrying",
                extra=kv(
                    error=str(exc),
                    attempt=state.attempt_number,
                    retry_in_s=round(wait, 2),
                    held=self._in_hand,
                ),
            )

    def _retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            wait=wait_exponential_jitter(multiplier=0.1, max=5.0, jitter=0.2),
            retry=retry_if_exception_type((UpstreamError, OSError)),
            stop=lambda _state: self._abandon.is_set(),
            sleep=self._interruptible_sleep,
            before_sleep=self._on_write_error,
            reraise=True,
        )

    async def _write(self, batch: Batch) -> bool:
        """Write one batch until QuestDB accepts it; False when given up at shutdown."""
        if batch.rows == 0:
            return True
        started = time.monotonic()
        try:
            async for attempt in self._retrying():
                with attempt:
                    t0 = time.monotonic()
                    await self.writer.write(batch.buffer)
                    self.last_flush_ms = round((time.monotonic() - t0) * 1000, 2)
        except (UpstreamError, OSError) as exc:
            log.error(
                "giving up on a batch at shutdown: its quotes stay in JetStream",
                extra=kv(rows=batch.rows, error=str(exc)),
            )
            return False
        if self.questdb_state != "up":
            if self.questdb_state == "down":
                log.info(
                    "QuestDB accepts writes again",
                    extra=kv(outage_s=round(time.monotonic() - started, 1)),
                )
            self.questdb_state = "up"
        self.flushes += 1
        self.rows_total += batch.rows
        self.last_flush_rows = batch.rows
        self.last_flush_ts = time.time()
        return True

    async def _ack(self, batch: Batch) -> None:
        nc = self.nc
        assert nc is not None
        try:
            await send_acks(nc, batch.replies)
            await send_acks(nc, batch.invalid, TERM)
            self.acks_sent += batch.messages
        except Exception as exc:  # an ack that does not reach the server means a redelivery
            self.errors += 1
            self.last_error = f"ack: {exc!r}"
            log.warning(
                "could not ack; the batch will be redelivered (harmless)", extra=kv(error=repr(exc))
            )

    def _done_with(self, batch: Batch) -> None:
        self._in_hand -= batch.messages
        self.messages_total += batch.messages
        self.writer.release(batch.buffer)

    async def _write_and_ack(self, batch: Batch) -> None:
        try:
            if await self._write(batch):
                await self._ack(batch)
                self._done_with(batch)
                self._last_progress_signal = time.monotonic()
            else:
                self._gave_up = True
        except Exception as exc:  # a bug: stop the stage (nothing acked: no loss)
            log.exception("persist write failed unexpectedly")
            self._failure = exc
            self._gave_up = True
        finally:
            self._writing.remove(batch)
            self._work.set()
        if self.pull is not None:
            await self.pull.top_up()

    async def _flush_loop(self) -> None:
        """Write sealed batches (``lanes`` at a time); seal the open batch when ``flush_ms`` old."""
        tasks: set[asyncio.Task[None]] = set()
        try:
            while not self._gave_up:
                if self._sealed and len(self._writing) < self.writer.lanes:
                    sealed = self._sealed.pop(0)
                    self._writing.append(sealed)
                    task = asyncio.create_task(self._write_and_ack(sealed), name="persist-write")
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    continue
                batch = self._batch
                timeout = None
                if not self._sealed and batch is not None:
                    # a partial batch is sealed by age (not during an outage: sealed ones wait)
                    timeout = (
                        0.0 if self._draining else batch.started + self.flush_s - time.monotonic()
                    )
                    if timeout <= 0:
                        self._seal()
                        continue
                if self._draining and not self._sealed and batch is None and not self._writing:
                    return
                self._work.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._work.wait(), timeout=timeout)
        finally:
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        if self._failure is not None:
            raise self._failure

    # --- lifecycle ---------------------------------------------------------------------------
    async def _on_reconnect(self) -> None:
        if self.pull is not None:
            self.pull.reset()
            await self.pull.top_up()

    def _consumer_gone(self) -> None:
        if self._consumer_task is None or self._consumer_task.done():
            self._consumer_task = asyncio.create_task(self._recreate_consumer())

    async def _recreate_consumer(self) -> None:
        assert self.js is not None
        try:
            await ensure_persist_consumer(self.js, self.settings)
        except Exception as exc:
            log.error("cannot recreate the JetStream consumer", extra=kv(error=str(exc)))
            return
        log.warning(
            "JetStream consumer was deleted; recreated it",
            extra=kv(consumer=self.settings.persist_consumer),
        )

    async def _wait_questdb(self, stop: asyncio.Event) -> bool:
        """Create the tables and open the writer, retrying until QuestDB answers or stop."""
        delay = 0.2
        attempt = 0
        while not stop.is_set():
            attempt += 1
            try:
                await asyncio.to_thread(ensure_tables, self.settings.questdb_url)
                await self.writer.open()
                self.questdb_state = "up"
                return True
            except UpstreamError as exc:
                self.questdb_state = "down"
                self.errors += 1
                self.last_error = str(exc)
                if attempt <= 3 or attempt % 20 == 0:
                    log.warning("waiting for QuestDB", extra=kv(error=str(exc), attempt=attempt))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
            delay = min(delay * 2, 5.0)
        return False

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set; then write and ack what is held, and close."""
        stop = stop or asyncio.Event()
        settings = self.settings
        connecting = asyncio.create_task(
            connect(settings.nats_url, name=self.name, on_reconnect=self._on_reconnect, attempts=0)
        )
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({connecting, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not connecting.done():  # stopped while NATS was still unreachable
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
            self.state = "stopped"
            return
        self.nc = nc = connecting.result()
        beat: asyncio.Task[None] | None = None
        flusher: asyncio.Task[None] | None = None
        try:
            self.js = js = nc.jetstream(timeout=5.0)
            await ensure_quotes_stream(js, settings)
            await ensure_persist_consumer(js, settings)
            self.state = "waiting_questdb"
            beat = asyncio.create_task(self._heartbeat(), name="persist-heartbeat")
            if not await self._wait_questdb(stop):
                return
            self.state = "running"
            log.info(
                "persisting quotes",
                extra=kv(
                    stream=settings.stream_name,
                    consumer=settings.persist_consumer,
                    batch_rows=self.batch_rows,
                    flush_ms=settings.persist_flush_ms,
                    questdb=settings.questdb_http_url,
                ),
            )
            self.pull = PullConsumer(
                nc,
                settings.stream_name,
                settings.persist_consumer,
                self._on_message,
                batch=self.batch_rows,
                max_held=self.max_held,
                held=self._held,
                on_consumer_gone=self._consumer_gone,
            )
            flusher = asyncio.create_task(self._flush_loop(), name="persist-flush")
            await self.pull.start()
            done, _ = await asyncio.wait({flusher, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if flusher in done:
                flusher.result()  # a bug: surface it
        finally:
            stopper.cancel()
            await self._shutdown(flusher, beat)

    async def _shutdown(
        self, flusher: asyncio.Task[None] | None, beat: asyncio.Task[None] | None
    ) -> None:
        self.state = "stopping"
        if self.pull is not None:
            await self.pull.stop()  # no more requests; what already arrived is processed
        if flusher is not None and not flusher.done():
            self._draining = True
            self._work.set()
            try:
                await asyncio.wait_for(asyncio.shield(flusher), timeout=SHUTDOWN_GRACE_S)
            except TimeoutError:
                self._abandon.set()  # QuestDB still down: stop retrying, ack nothing
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(flusher, timeout=5.0)
            except Exception as exc:
                log.error("persist flush failed at shutdown", extra=kv(error=repr(exc)))
        for task in (self._consumer_task, beat):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self.state = "stopped"
        nc = self.nc
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                if nc.is_connected:
                    await nc.publish(status_subject(COMPONENT), orjson.dumps(self.status()))
                    await nc.flush(timeout=2)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), timeout=2.0)
        await self.writer.close()
        log.info(
            "persist stopped",
            extra=kv(
                rows_total=self.rows_total,
                invalid=self.invalid,
                flushes=self.flushes,
                unwritten=self._in_hand,
            ),
        )


async def run_persist(settings: Settings, stop: asyncio.Event | None = None) -> Persister:
    """Run the persist stage until ``stop`` is set; returns it for its counters."""
    persister = Persister(settings)
    await persister.run(stop)
    return persister


__all__ = ["Persister", "run_persist"]
