"""Several stages in one process: what ``sow up`` runs (the seed's "full system").

Stages: ``publish`` (the Bybit listener -> NATS), ``cache`` (NATS -> Dragonfly/Redis), ``persist``
(JetStream -> QuestDB) and ``api`` (``sow serve-api`` with ``/ws`` and the built dashboard). Each
runs under a supervisor: a stage that fails is reported and restarted with capped, jittered
backoff — never silently dropped — and a stage that finishes by itself (a replay that reached
its end) stays finished while the others keep serving. Stop (Ctrl+C) stops every stage in
reverse order of dependence, so ``persist`` flushes and acks what it holds before exiting.

Before starting, :func:`check_dependencies` makes sure the servers the chosen stages need answer
(NATS for all; Redis for cache and api; QuestDB for persist and api), and with ``infra=True``
starts them first through :mod:`sowcli.infra`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from sowcli.config import Settings
from sowcli.errors import ConfigError, UpstreamError, UsageError
from sowcli.logs import kv
from sowcli.metrics import Stage
from sowcli.runtime import backoff_s

log = logging.getLogger("sow.up")

STAGES = ("publish", "cache", "persist", "api")
NEEDS: dict[str, tuple[str, ...]] = {
    "publish": ("nats",),
    "cache": ("nats", "redis"),
    "persist": ("nats", "questdb"),
    "api": ("nats", "redis", "questdb"),
}
COMPONENT = {"publish": "publisher", "cache": "cache", "persist": "persist", "api": "api"}
RESTART_CAP_S = 30.0
HEALTHY_RUN_S = 60.0  # a stage that ran this long before failing starts its backoff afresh


def select_stages(only: str | None, skip: str | None) -> list[str]:
    """``--only``/``--skip`` (comma-separated) -> the stages to run, in dependency order."""

    def parse(text: str, flag: str) -> set[str]:
        names = {p.strip().lower() for p in text.split(",") if p.strip()}
        names = {"api" if n in ("serve-api", "serve_api") else n for n in names}
        unknown = names - set(STAGES)
        if unknown:
            raise UsageError(
                f"{flag}: unknown stage {', '.join(sorted(unknown))} (choose from {', '.join(STAGES)})"
            )
        return names

    chosen = parse(only, "--only") if only else set(STAGES)
    if skip:
        chosen -= parse(skip, "--skip")
    if not chosen:
        raise UsageError("--only/--skip leave no stage to run")
    return [s for s in STAGES if s in chosen]


def needed_servers(stages: Sequence[str]) -> list[str]:
    out: list[str] = []
    for stage in stages:
        for server in NEEDS[stage]:
            if server not in out:
                out.append(server)
    return out


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    first = url.split(",")[0].strip()
    parsed = urlparse(first if "://" in first else f"tcp://{first}")
    return parsed.hostname or "localhost", parsed.port or default_port


def server_address(settings: Settings, server: str) -> tuple[str, str, int]:
    """(setting that names it, host, port) of one dependency."""
    if server == "nats":
        return ("nats_url", *_host_port(settings.nats_url, 4222))
    if server == "redis":
        return ("dragonfly_url", *_host_port(settings.dragonfly_url, 6379))
    return ("questdb_url", *_host_port(settings.questdb_url, 8812))


async def check_dependencies(
    settings: Settings, servers: Sequence[str], timeout_s: float = 3.0
) -> None:
    """Raise UpstreamError naming every server that does not accept connections."""

    async def probe(server: str) -> str | None:
        key, host, port = server_address(settings, server)
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
        except (OSError, TimeoutError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            return f"{server} at {host}:{port} ({key}): {reason}"
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        return None

    problems = [p for p in await asyncio.gather(*(probe(s) for s in servers)) if p]
    if problems:
        raise UpstreamError(
            "not reachable: " + "; ".join(problems) + " — start them with `sow infra up` "
            "or run `sow up --infra`"
        )


@dataclass
class Supervised:
    """One stage under supervision."""

    name: str
    make: Callable[[], Stage]
    stage: Stage | None = None
    state: str = "starting"  # starting | running | restarting | finished | stopped
    restarts: int = 0
    last_error: str = ""
    since: float = field(default_factory=time.time)

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        if self.stage is not None:
            with contextlib.suppress(Exception):
                doc = dict(self.stage.status())
        doc.update(supervisor_state=self.state, restarts=self.restarts)
        if self.last_error:
            doc["last_error"] = self.last_error
        return doc


class Hub:
    """The stages of ``sow up``, each supervised, sharing one event loop."""

    def __init__(
        self,
        settings: Settings,
        stages: Sequence[str],
        *,
        source: str = "bybit",
        speed: float | None = 1.0,
    ) -> None:
        self.settings = settings
        self.source = source
        self.speed = speed
        self.supervised = [Supervised(name, functools.partial(self._make, name)) for name in stages]
        self.fatal: Exception | None = None
        self._fatal_event = asyncio.Event()

    def _make(self, name: str) -> Stage:
        """A fresh stage object (imports are lazy: a stage not run costs nothing)."""
        s = self.settings
        if name == "publish":
            from sowcli.publish import Publisher, SourceSpec

            return Publisher(s, source=SourceSpec.parse(self.source), speed=self.speed)
        if name == "cache":
            from sowcli.sinks.cache import CacheStage

            return CacheStage(s)
        if name == "persist":
            from sowcli.persist import Persister

            return Persister(s)
        from sowcli.servers.api import ApiServer

        return ApiServer(s)

    def stages(self) -> list[tuple[str, Stage]]:
        """(component, stage) of every stage currently running — for metrics."""
        return [(COMPONENT[sv.name], sv.stage) for sv in self.supervised if sv.stage is not None]

    def status(self) -> dict[str, dict[str, Any]]:
        return {sv.name: sv.status() for sv in self.supervised}

    async def _supervise(self, sv: Supervised, stop: asyncio.Event) -> None:
        attempt = 0
        while not stop.is_set():
            started = time.monotonic()
            try:
                sv.stage = sv.make()
                sv.state = "running"
                sv.since = time.time()
                await sv.stage.run(stop)
            except asyncio.CancelledError:
                raise
            except (ConfigError, UsageError) as exc:
                # a port in use or a bad value will not fix itself: stop the hub, say why
                sv.state = "failed"
                sv.last_error = str(exc)
                self.fatal = exc
                self._fatal_event.set()
                return
            except Exception as exc:  # reported and restarted, never silently dropped
                if stop.is_set():
                    break
                attempt = 1 if time.monotonic() - started > HEALTHY_RUN_S else attempt + 1
                delay = backoff_s(attempt, RESTART_CAP_S, base_s=1.0)
                sv.state = "restarting"
                sv.restarts += 1
                sv.last_error = str(exc) or repr(exc)
                log.error(
                    f"stage {sv.name} failed; restarting in {delay:.1f}s",
                    extra=kv(stage=sv.name, error=sv.last_error, restarts=sv.restarts),
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                continue
            if stop.is_set():
                break
            sv.state = "finished"  # e.g. a replay that reached its end
            log.info(f"stage {sv.name} finished", extra=kv(stage=sv.name))
            return
        sv.state = "stopped"

    async def run(self, stop: asyncio.Event) -> None:
        """Run every stage until ``stop``; then stop them, consumers last (persist flushes)."""
        # Each stage gets its own stop event so shutdown can be ordered: the publisher first
        # (no new quotes), then the API, then cache and persist flush what they hold.
        own = {sv.name: asyncio.Event() for sv in self.supervised}
        tasks = {
            sv.name: asyncio.create_task(self._supervise(sv, own[sv.name]), name=f"up-{sv.name}")
            for sv in self.supervised
        }
        try:
            stopper = asyncio.create_task(stop.wait())
            fatal = asyncio.create_task(self._fatal_event.wait())
            await asyncio.wait({stopper, fatal}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            fatal.cancel()
        finally:
            for name in ("publish", "api", "cache", "persist"):
                if name not in tasks:
                    continue
                own[name].set()
                try:
                    await asyncio.wait_for(asyncio.shield(tasks[name]), timeout=10)
                except (TimeoutError, Exception) as exc:
                    if not isinstance(exc, TimeoutError):
                        log.error("stage stop failed", extra=kv(stage=name, error=repr(exc)))
                    tasks[name].cancel()
                    with contextlib.suppress(BaseException):
                        await tasks[name]
        if self.fatal is not None:
            raise self.fatal


__all__ = ["NEEDS", "STAGES", "Hub", "check_dependencies", "needed_servers", "select_stages"]
