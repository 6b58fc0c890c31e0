"""Running an async stage from a synchronous command: event loop choice and signal handling.

:func:`run_until_signal` runs ``main(stop)`` on uvloop when it is installed; SIGINT and SIGTERM set
``stop`` (the stage then shuts down cleanly), a second signal cancels the stage outright.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sowcli.errors import ConfigError

T = TypeVar("T")


def bind_socket(host: str, port: int, *, what: str = "server") -> socket.socket:
    """A listening TCP socket (port 0: any free port); ConfigError naming the address when it
    cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"{what}: cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from None
    sock.setblocking(False)
    return sock


def backoff_s(attempt: int, cap_s: float, base_s: float = 0.5) -> float:
    """Capped exponential backoff with full jitter for the ``attempt``-th retry (1-based):
    tenacity's ``wait_random_exponential``, usable outside a tenacity retry loop."""
    from tenacity import RetryCallState, wait_random_exponential

    state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]  # only attempt_number is read
    state.attempt_number = max(1, attempt)
    return float(wait_random_exponential(multiplier=base_s, max=cap_s)(state))


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def run_until_signal(main: Callable[[asyncio.Event], Awaitable[T]]) -> T:
    """Run ``main(stop)``; the first SIGINT/SIGTERM sets ``stop``, the second cancels ``main``."""

    async def runner() -> T:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        hits = 0

        def on_signal() -> None:
            nonlocal hits
            hits += 1
            if hits == 1:
                stop.set()
            elif task is not None:
                task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        try:
            return await main(stop)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    with asyncio.Runner(loop_factory=new_event_loop) as r:
        return r.run(runner())
