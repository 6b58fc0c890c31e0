"""Fake Bybit v5 servers for tests and benchmarks.

* :class:`tests.fakes.bybit_ws.FakeBybit`: the public websocket streams (spot and linear).
* :class:`tests.fakes.bybit_rest.FakeBybitRest`: the public REST market endpoints.

The names are re-exported lazily, so that ``python -m tests.fakes.bybit_ws`` does not import the
module twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .bybit_rest import FakeBybitRest
    from .bybit_ws import FakeBybit

__all__ = ["FakeBybit", "FakeBybitRest"]


def __getattr__(name: str) -> Any:
    if name == "FakeBybit":
        from .bybit_ws import FakeBybit

        return FakeBybit
    if name == "FakeBybitRest":
        from .bybit_rest import FakeBybitRest

        return FakeBybitRest
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
