"""Settings: defaults < config.json < environment < command-line flags, resolved in one place.

Every key is a field of :class:`Settings` with its default, the environment variable that
overrides it and a one-line help text in the field metadata; the README's configuration table and
the validation messages are derived from the same place. A broken value raises
:class:`~sowcli.errors.ConfigError` naming the source (file, variable or flag), the key and the
problem.

The config file is ``--config``, else ``$SOW_CONFIG``, else ``./config.json`` when it exists.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sowcli.errors import ConfigError

SYMBOL_RE = re.compile(r"^[A-Z0-9]{2,30}$")
MARKETS = ("spot", "futures")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# The seed's 15 symbols, with one deliberate change: Bybit renamed MATIC to POL in September 2024
# and MATICUSDT no longer trades, so the default list carries POLUSDT. A config that still lists
# MATICUSDT gets a warning that names the new symbol (see sowcli.sources.bybit).
DEFAULT_SYMBOLS = (
    "BTCUSDT",
    "ETHUSDT",
    "BNBUSDT",
    "SOLUSDT",
    "XRPUSDT",
    "ADAUSDT",
    "DOGEUSDT",
    "TRXUSDT",
    "TONUSDT",
    "AVAXUSDT",
    "LINKUSDT",
    "DOTUSDT",
    "POLUSDT",
    "ICPUSDT",
    "NEARUSDT",
)
RENAMED_SYMBOLS = {"MATICUSDT": "POLUSDT"}


def _key(default: Any, help: str, env: str | None = None, **extra: Any) -> Any:
    meta = {"help": help, "env": env, **extra}
    if isinstance(default, list | tuple):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting sow knows. Field metadata: ``help``, ``env`` (else ``SOW_<KEY>``)."""

    # --- the seed's keys -------------------------------------------------------------------
    symbols: list[str] = _key(DEFAULT_SYMBOLS, "symbols to stream (upper-case Bybit names)")
    reconnect_timeout_seconds: float = _key(
        30.0, "cap of the jittered exponential backoff between reconnect attempts, seconds"
    )
    max_retries: int = _key(
        0,
        "consecutive failed connection attempts before `sow publish` exits with code 3 "
        "(so a supervisor restarts it); 0 = retry forever",
    )
    log_level: str = _key("INFO", "DEBUG, INFO, WARNING or ERROR")
    # --- publisher -------------------------------------------------------------------------
    markets: list[str] = _key(list(MARKETS), "markets to stream: spot, futures")
    log_format: str = _key("kv", "log line format: kv (key=value) or json")
    nats_url: str = _key("nats://localhost:4222", "NATS server URL(s), comma-separated", "NATS_URL")
    bybit_spot_url: str = _key(
        "wss://stream.bybit.com/v5/public/spot", "Bybit spot public stream", "SOW_BYBIT_SPOT_URL"
    )
    bybit_linear_url: str = _key(
        "wss://stream.bybit.com/v5/public/linear",
        "Bybit USDT linear public stream",
        "SOW_BYBIT_LINEAR_URL",
    )
    bybit_rest_url: str = _key("https://api.bybit.com", "Bybit REST base URL", "SOW_BYBIT_REST_URL")
    spot_book: bool = _key(True, "fill SPOT bid/ask from orderbook.1 (else null)")
    validate_symbols: bool = _key(
        True, "check symbols against REST instruments-info at start (when reachable)"
    )
    ping_interval_seconds: float = _key(20.0, "interval of Bybit's text ping")
    pong_timeout_seconds: float = _key(10.0, "reconnect when no pong arrives within this time")
    idle_timeout_seconds: float = _key(
        60.0, "reconnect a connection that received no data frame for this long"
    )
    stale_after_seconds: float = _key(
        30.0, "report a symbol as stale after this long without an update"
    )
    publish_buffer: int = _key(
        100_000, "quotes held while NATS is unreachable; beyond it the oldest are dropped (counted)"
    )
    heartbeat_interval_seconds: float = _key(1.0, "interval of sow.status.* heartbeats")
    metrics_port: int = _key(
        0, "serve Prometheus metrics of a long-running stage on this port (0 = off)"
    )
    metrics_host: str = _key("127.0.0.1", "address the --metrics-port server binds")
    publish_ensure_stream: bool = _key(
        True, "`sow publish` creates/updates the JetStream stream for `sow persist` at start"
    )
    # --- storage and serving ---------------------------------------------------------------
    dragonfly_url: str = _key(
        "redis://localhost:6379/0", "Dragonfly/Redis URL (host:port accepted)", "DRAGONFLY_URL"
    )
    questdb_url: str = _key(
        "postgres://admin:quest@localhost:8812/qdb",
        "QuestDB PostgreSQL-wire URL, for queries",
        "QUESTDB_URL",
    )
    questdb_http_url: str = _key(
        "http://localhost:9000", "QuestDB HTTP URL, for ILP/HTTP writes", "QUESTDB_HTTP_URL"
    )
    # --- sow cache -------------------------------------------------------------------------
    cache_history_max: int = _key(1000, "entries kept in history:{market}:{symbol} (newest first)")
    cache_timeseries_days: int = _key(
        7, "days a timeseries:{market}:{symbol}:{date} key lives before it expires"
    )
    cache_flush_ms: int = _key(50, "cache writes are coalesced and pipelined at most this long")
    cache_queue_group: str = _key("sow-cache", "NATS queue group shared by `sow cache` processes")
    # --- sow persist -----------------------------------------------------------------------
    stream_name: str = _key("QUOTES", "JetStream stream capturing quotes.>")
    stream_max_age_hours: float = _key(72.0, "JetStream QUOTES keeps messages at most this long")
    stream_max_bytes: int = _key(
        2 * 1024**3, "JetStream QUOTES keeps at most this many bytes (oldest dropped first)"
    )
    persist_consumer: str = _key(
        "sow-persist", "durable JetStream consumer shared by `sow persist`"
    )
    persist_batch_rows: int = _key(10_000, "rows per QuestDB write (flush when reached)")
    persist_flush_ms: int = _key(250, "flush a partial batch after this many milliseconds")
    persist_ack_wait_seconds: float = _key(
        30.0, "JetStream ack wait: messages of a crashed `sow persist` are redelivered after this"
    )
    # --- sow backfill ----------------------------------------------------------------------
    backfill_requests_per_second: float = _key(
        20.0, "client-side REST rate limit (Bybit allows 600 per 5 s per IP)"
    )
    # --- serving: sow serve-api and sow serve-ws ---------------------------------------------
    api_host: str = _key(
        "127.0.0.1", "address `sow serve-api` listens on (0.0.0.0: every interface)"
    )
    api_port: int = _key(8080, "port of `sow serve-api` (REST, /health, /metrics, /docs, /ws)")
    ws_host: str = _key("127.0.0.1", "address `sow serve-ws` listens on")
    ws_port: int = _key(8081, "port of `sow serve-ws` (the WebSocket bridge alone)")
    cors_origins: list[str] = _key(
        ("http://localhost:3000", "http://127.0.0.1:3000"),
        "browser origins allowed to call the REST API (CORS); * = any",
    )
    ws_allowed_origins: list[str] = _key(
        (
            "http://localhost:3000",
            "http://127.0.0.1:3000",
            "http://localhost:8080",
            "http://127.0.0.1:8080",
        ),
        "browser origins allowed to open the WebSocket (others get HTTP 403; the server's own "
        "origin and clients sending no Origin are always allowed); * = any",
    )
    api_rate_limit_per_second: float = _key(
        50.0, "requests per second per client IP (token bucket refill); 0 = no limit"
    )
    api_rate_limit_burst: int = _key(100, "requests a client IP may send at once (bucket size)")
    api_trusted_proxies: list[str] = _key(
        ("127.0.0.1",), "proxies whose X-Forwarded-For names the client (for the rate limit)"
    )
    api_redis_timeout_seconds: float = _key(
        0.5, "longest the API waits for Dragonfly/Redis before falling back or answering 503"
    )
    api_questdb_timeout_seconds: float = _key(
        5.0, "longest the API waits for a QuestDB query before answering 504"
    )
    api_questdb_pool_size: int = _key(8, "QuestDB connections the API keeps (psycopg_pool)")
    api_query_cache_ms: int = _key(
        1000, "identical history/stats/ohlc requests within this time share one answer; 0 = off"
    )
    api_query_cache_entries: int = _key(512, "answers kept by that short-lived cache")
    api_health_required: list[str] = _key(
        ("redis", "questdb", "nats"), "dependencies whose outage makes /health answer 503"
    )
    api_static_dir: str = _key(
        "frontend/out", "static export of the web dashboard, served at /market when present"
    )
    ws_max_clients: int = _key(1000, "WebSocket clients one server accepts (others get HTTP 503)")
    ws_batch_ms: int = _key(100, "WebSocket updates go out at most this often (conflated)")
    ws_client_queue_bytes: int = _key(
        1_048_576,
        "unsent bytes a WebSocket client may have queued; beyond it its updates are conflated",
    )
    ws_slow_client_seconds: float = _key(
        10.0, "a WebSocket client that stays behind this long is disconnected"
    )
    ws_ping_interval_seconds: float = _key(20.0, "WebSocket ping interval (keepalive)")
    ws_ping_timeout_seconds: float = _key(20.0, "close a WebSocket whose pong is this late")
    ws_max_message_bytes: int = _key(65_536, "largest message a WebSocket client may send")
    ws_max_invalid_messages: int = _key(
        10, "invalid messages after which a WebSocket client is closed with code 1008"
    )
    ws_max_symbols: int = _key(1000, "symbols one WebSocket client may subscribe to")


def env_var(key: str) -> str:
    """The environment variable that overrides ``key``."""
    f = _FIELDS[key]
    env = f.metadata.get("env")
    return str(env) if env else f"SOW_{key.upper()}"


_FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(Settings)}
_TYPES: dict[str, Any] = typing.get_type_hints(Settings)


def keys() -> list[str]:
    return list(_FIELDS)


def describe() -> list[tuple[str, str, str, str]]:
    """(key, environment variable, default, help) for every setting: the README table."""
    rows = []
    defaults = Settings()
    for name, f in _FIELDS.items():
        value = getattr(defaults, name)
        shown = ",".join(value) if isinstance(value, list) else json.dumps(value)
        rows.append((name, env_var(name), shown, str(f.metadata.get("help", ""))))
    return rows


# --- validation ----------------------------------------------------------------------------


def _coerce(key: str, raw: Any, *, from_text: bool) -> Any:
    """Turn ``raw`` into the declared type of ``key`` or raise ValueError with the problem."""
    typ = _TYPES[key]
    origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        if from_text and isinstance(raw, str):
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        raise ValueError(f"expected true or false, got {raw!r}")
    if typ is int:
        if isinstance(raw, bool):
            raise ValueError(f"expected an integer, got {raw!r}")
        if isinstance(raw, int):
            return raw
        if from_text and isinstance(raw, str):
            try:
                return int(raw.strip())
            except ValueError:
                pass
        raise ValueError(f"expected an integer, got {raw!r}")
    if typ is float:
        if isinstance(raw, bool):
            raise ValueError(f"expected a number, got {raw!r}")
        if isinstance(raw, int | float):
            return float(raw)
        if from_text and isinstance(raw, str):
            try:
                return float(raw.strip())
            except ValueError:
                pass
        raise ValueError(f"expected a number, got {raw!r}")
    if typ is str:
        if isinstance(raw, str):
            return raw
        raise ValueError(f"expected a string, got {raw!r}")
    if origin is list:
        if from_text and isinstance(raw, str):
            raw = [part.strip() for part in raw.split(",") if part.strip()]
        if not isinstance(raw, list):
            raise ValueError(f"expected a list of strings, got {raw!r}")
        for i, item in enumerate(raw):
            if not isinstance(item, str):
                raise ValueError(f"item {i + 1} {item!r} is not a string")
        return list(raw)
    raise TypeError(f"unsupported setting type {typ!r}")  # pragma: no cover - programming error


def _check(key: str, value: Any) -> Any:
    """Key-specific rules; returns the normalised value or raises ValueError."""
    if key == "symbols":
        out: list[str] = []
        for i, sym in enumerate(value):
            norm = sym.strip().upper()
            if not SYMBOL_RE.match(norm):
                raise ValueError(f"item {i + 1} {sym!r} is not a valid symbol (A-Z and 0-9, 2-30)")
            if norm not in out:
                out.append(norm)
        if not out:
            raise ValueError("needs at least one symbol")
        return out
    if key == "markets":
        out = []
        for m in value:
            norm = m.strip().lower()
            if norm not in MARKETS:
                raise ValueError(f"unknown market {m!r} (choose from spot, futures)")
            if norm not in out:
                out.append(norm)
        if not out:
            raise ValueError("needs at least one market")
        return out
    if key == "log_level":
        norm = value.strip().upper()
        if norm not in LOG_LEVELS:
            raise ValueError(f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
        return norm
    if key == "log_format":
        norm = value.strip().lower()
        if norm not in ("kv", "json"):
            raise ValueError(f"{value!r} is not kv or json")
        return norm
    if key == "metrics_port" and not 0 <= value <= 65535:
        raise ValueError("must be a TCP port (1-65535) or 0 for off")
    if key == "max_retries" and value < 0:
        raise ValueError("must be 0 (forever) or more")
    if (
        key
        in (
            "publish_buffer",
            "cache_history_max",
            "cache_timeseries_days",
            "cache_flush_ms",
            "stream_max_bytes",
            "persist_batch_rows",
            "persist_flush_ms",
        )
        and value < 1
    ):
        raise ValueError("must be at least 1")
    if isinstance(value, float) and key.endswith("_seconds") and value <= 0:
        raise ValueError("must be greater than 0")
    if key.endswith("_url") and isinstance(value, str) and not value.strip():
        raise ValueError("must not be empty")
    return value


def _apply(key: str, raw: Any, *, source: str, from_text: bool) -> Any:
    try:
        return _check(key, _coerce(key, raw, from_text=from_text))
    except ValueError as exc:
        raise ConfigError(f"{source}: key '{key}': {exc}") from None


def _unknown_key(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(_FIELDS), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{source}: unknown key '{key}'{hint}")


def config_path(
    explicit: str | Path | None, environ: Mapping[str, str] | None = None
) -> Path | None:
    """The config file to read: explicit > $SOW_CONFIG > ./config.json (if present) > none."""
    env = os.environ if environ is None else environ
    if explicit:
        return Path(explicit)
    if env.get("SOW_CONFIG"):
        return Path(env["SOW_CONFIG"])
    default = Path("config.json")
    return default if default.is_file() else None


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    return data


def load_settings(
    config: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Resolve settings: defaults < config file < environment < ``overrides`` (CLI flags).

    ``overrides`` maps keys to values; ``None`` means "flag not given". Keys starting with ``_``
    in the config file are comments and ignored.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = config_path(config, env)
    if path is not None:
        for key, raw in read_config_file(path).items():
            if key.startswith("_"):
                continue
            if key not in _FIELDS:
                raise _unknown_key(key, str(path))
            values[key] = _apply(key, raw, source=str(path), from_text=False)
    for key in _FIELDS:
        name = env_var(key)
        if name in env and env[name].strip() != "":
            values[key] = _apply(key, env[name], source=f"environment {name}", from_text=True)
    for key, raw in (overrides or {}).items():
        if raw is None:
            continue
        if key not in _FIELDS:
            raise _unknown_key(key, "command line")
        flag = "--" + key.replace("_", "-")
        values[key] = _apply(key, raw, source=flag, from_text=isinstance(raw, str))
    return dataclasses.replace(Settings(), **values)


def redis_url(raw: str) -> str:
    """Accept ``host:port`` as well as ``redis://`` URLs (the seed's DRAGONFLY_URL was host:port)."""
    if "://" in raw:
        return raw
    return f"redis://{raw}"


__all__ = [
    "DEFAULT_SYMBOLS",
    "MARKETS",
    "RENAMED_SYMBOLS",
    "Settings",
    "config_path",
    "describe",
    "env_var",
    "keys",
    "load_settings",
    "redis_url",
]
