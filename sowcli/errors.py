"""The exceptions sow raises on purpose.

::

    SowError                  anything sow reports as one clear line (exit code 1)
    ├── ConfigError           bad config file, environment variable or flag (exit code 2)
    ├── UsageError            bad user input on the command line: symbol, market, time (exit code 2)
    ├── UpstreamError         a server sow depends on failed or refused (NATS, Redis, QuestDB, Bybit)
    │   └── ExchangeBanned    Bybit answered HTTP 403: the IP is rate-limit banned
    └── RetriesExhausted      ``max_retries`` consecutive reconnects failed (exit code 3)

Library code raises these with a message meant for a human; only the CLI turns them into output.
"""

from __future__ import annotations


class SowError(Exception):
    """Base class: the message is shown to the user as one line."""

    exit_code = 1


class ConfigError(SowError):
    """A configuration value is wrong; the message names the file/variable/flag and the key."""

    exit_code = 2


class UsageError(SowError):
    """A command-line value is wrong (symbol, market, interval, time range...)."""

    exit_code = 2


class UpstreamError(SowError):
    """A dependency (NATS, Redis, QuestDB, Bybit) failed or is unreachable."""


class ExchangeBanned(UpstreamError):
    """Bybit answered HTTP 403: too many requests from this IP (a ban of 10 minutes or more)."""


class RetriesExhausted(SowError):
    """The configured ``max_retries`` consecutive reconnect attempts all failed."""

    exit_code = 3
