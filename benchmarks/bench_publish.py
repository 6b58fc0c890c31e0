"""Benchmark: Bybit linear ticker frames -> NATS, sow against bare relays and cryptofeed.

One run starts a real nats-server (``sowcli.infra.start_nats``) and, for every contender and every
repeat, a fresh fake Bybit exchange process (``python -m tests.fakes.bybit_ws``) that sends one
snapshot per ``tickers.{SYMBOL}`` topic, then linear deltas. Contenders, each its own process:

  sow               the real ``sow publish`` code path (``python -m sowcli publish --markets futures``)
                    : picows listener -> Feed -> snapshot/delta merge -> Quote -> NatsPublisher
  relay-websockets  bare relay on the ``websockets`` client: recv + orjson.loads + orjson.dumps +
                    ``await nc.publish`` per message, no normalisation (benchmarks/relay_bare.py)
  relay-picows      bare relay on picows (Cython client), publishes drained in a loop by one task
                    (benchmarks/relay_bare.py)
  cryptofeed        cryptofeed 2.4.1's Bybit feed publishing its Ticker to NATS
                    (benchmarks/relay_cryptofeed.py, run by --cryptofeed-python; "not installed"
                    when that interpreter has no cryptofeed). It is not a dependency of sow;
                    give it a venv of its own:
                      python3 -m venv /tmp/cf-venv
                      /tmp/cf-venv/bin/pip install cryptofeed==2.4.1 nats-py orjson

Measured per contender, each figure the median over --repeats runs:

  CPU us/frame   utime+stime of the relay process (/proc/PID/stat) divided by the messages it
  (max rate)     published (nats-server /connz in_msgs of its connection). The fake sends
                 --max-frames deltas as fast as the socket takes them (--rate 0), each burst of
                 frames in one socket write as a busy server does (one write per frame made the
                 fake the bottleneck: a fast relay then idled between tiny reads and was charged
                 the machine's ~100 us wake-up per read instead of its work per frame). The span is the
                 whole delta stream: from the moment the relay has published every snapshot
                 until its last delta reaches the server, so backlogs and buffered publishes are
                 paid for. This is the figure that survives a noisy machine.
  quotes/s       messages published per second of wall time over the same span. On a 2-core
                 machine the fake exchange (a Python websockets server) can still be the
                 bottleneck: its CPU % is shown next to it.
  CPU us @rate   the same CPU figure over a --latency-window at --rate frames/s (2,000): at a
                 realistic rate each socket read carries a few frames, so per-read costs (task
                 switches, syscalls, NATS flushes) weigh more than at max rate.
  latency        at --rate frames/s, a NATS subscriber (a task of this script) stamps every message
                 it receives. "read->sub" = subscriber time - the relay's own socket-read time
                 (sow: Quote.recv_us; bare relays: the recv_us key they add; cryptofeed: its
                 receipt_timestamp). "exch->sub" = subscriber time - the frame's ts (the fake's send
                 time, ms resolution): the same measure for every contender.
  RSS            peak resident set (VmHWM) of the relay process, at --rate and at max rate.

Other processes on the machine disturb wall figures (throughput, latency) much more than CPU
per frame; the report says how many cores they kept busy.

Targets of issue 2 (reported, not asserted): sow <= 0.5x cryptofeed's CPU per frame, p99 <= 5 ms
at 2,000 frames/s, RSS <= 80 MB.

Example (3-4 minutes with the defaults):

  .venv/bin/python benchmarks/bench_publish.py --json bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from sowcli.infra import start_nats  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
DEFAULT_CF_PYTHON = "/tmp/cf-venv/bin/python"

# Real Bybit linear perpetual names (the fake accepts any; cryptofeed needs BASEUSDT).
SYMBOLS = (
    "BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT", "ADAUSDT", "DOGEUSDT", "TRXUSDT",
    "TONUSDT", "AVAXUSDT", "LINKUSDT", "DOTUSDT", "POLUSDT", "ICPUSDT", "NEARUSDT", "LTCUSDT",
    "BCHUSDT", "ATOMUSDT", "UNIUSDT", "ETCUSDT", "FILUSDT", "APTUSDT", "ARBUSDT", "OPUSDT",
    "SUIUSDT", "INJUSDT", "SEIUSDT", "TIAUSDT", "WLDUSDT", "AAVEUSDT", "MKRUSDT", "LDOUSDT",
    "RUNEUSDT", "XLMUSDT", "HBARUSDT", "VETUSDT", "ALGOUSDT", "SANDUSDT", "MANAUSDT", "AXSUSDT",
    "GALAUSDT", "APEUSDT", "CRVUSDT", "DYDXUSDT", "GMXUSDT", "STXUSDT", "IMXUSDT", "RNDRUSDT",
    "FETUSDT", "ENAUSDT", "JUPUSDT", "PYTHUSDT", "ORDIUSDT", "WIFUSDT", "BONKUSDT", "FLOKIUSDT",
    "SHIBUSDT", "PEPEUSDT", "KASUSDT", "ONDOUSDT",
)  # fmt: skip


# --------------------------------------------------------------------------- contenders


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    nats_name: str  # the NATS connection name, to find its in_msgs in /connz
    subject: str  # what the latency subscriber listens to
    command: Callable[[Options, str, str], tuple[list[str], dict[str, str]]]
    stamps: Callable[[dict[str, Any]], tuple[float, float]]  # payload -> (read_us, ts_ms)


def _sow_command(opts: Options, ws_base: str, nats_url: str) -> tuple[list[str], dict[str, str]]:
    env = {
        "SOW_BYBIT_LINEAR_URL": ws_base + "/v5/public/linear",
        "SOW_VALIDATE_SYMBOLS": "0",
        # Like the other contenders, publish to core NATS only: the JetStream capture for
        # `sow persist` costs the server (disk writes), not the publisher, and would steal a core.
        "SOW_PUBLISH_ENSURE_STREAM": "0",
        "NATS_URL": nats_url,
    }
    argv = [
        opts.python,
        "-m",
        "sowcli",
        "publish",
        "--markets",
        "futures",
        "--symbols",
        ",".join(opts.symbols),
    ]
    return argv, env


def _bare_command(client: str) -> Callable[[Options, str, str], tuple[list[str], dict[str, str]]]:
    def build(opts: Options, ws_base: str, nats_url: str) -> tuple[list[str], dict[str, str]]:
        argv = [
            opts.python,
            str(ROOT / "benchmarks" / "relay_bare.py"),
            "--client",
            client,
            "--url",
            ws_base + "/v5/public/linear",
            "--nats",
            nats_url,
            "--symbols",
            ",".join(opts.symbols),
            "--prefix",
            f"bench.{client}",
        ]
        return argv, {}

    return build


def _cf_command(opts: Options, ws_base: str, nats_url: str) -> tuple[list[str], dict[str, str]]:
    argv = [
        opts.cf_python,
        str(ROOT / "benchmarks" / "relay_cryptofeed.py"),
        "--url",
        ws_base + "/v5/public/linear",
        "--nats",
        nats_url,
        "--symbols",
        ",".join(opts.symbols),
        "--prefix",
        "bench.cryptofeed",
    ]
    return argv, {}


def _relay_stamps(doc: dict[str, Any]) -> tuple[float, float]:
    return float(doc["recv_us"]), float(doc["ts"])


def _cf_stamps(doc: dict[str, Any]) -> tuple[float, float]:
    # receipt_timestamp: time.time() when cryptofeed read the frame; Bybit's Ticker.timestamp is
    # the frame's ts as sent (ms), which cryptofeed 2.4.1 does not convert to seconds.
    return doc["receipt_timestamp"] * 1e6, float(doc["timestamp"])


CONTENDERS: dict[str, Contender] = {
    c.key: c
    for c in (
        Contender("sow", "sow", "sow-publish", "quotes.futures.>", _sow_command, _relay_stamps),
        Contender(
            "relay-websockets",
            "bare websockets",
            "bench-relay-websockets",
            "bench.websockets.>",
            _bare_command("websockets"),
            _relay_stamps,
        ),
        Contender(
            "relay-picows",
            "bare picows (drained)",
            "bench-relay-picows",
            "bench.picows.>",
            _bare_command("picows"),
            _relay_stamps,
        ),
        Contender(
            "cryptofeed",
            "cryptofeed 2.4.1",
            "bench-cryptofeed",
            "bench.cryptofeed.>",
            _cf_command,
            _cf_stamps,
        ),
    )
}


@dataclass
class Options:
    symbols: list[str]
    repeats: int
    rate: float
    warmup_s: float
    max_frames: int
    latency_window_s: float
    contenders: list[str]
    python: str
    cf_python: str
    workdir: Path
    json_path: Path | None
    cf_version: str | None = None
    cf_requested: bool = False


# --------------------------------------------------------------------------- /proc and nats


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        rest = fh.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores (/proc/stat)."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / CLK_TCK, sum(values) / CLK_TCK


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


async def published(monitor_port: int, name: str) -> int | None:
    """Messages the client named ``name`` has published (nats-server's in_msgs for it), or
    ``None`` while no client of that name is connected."""
    doc = await asyncio.to_thread(_get_json, f"http://127.0.0.1:{monitor_port}/connz?limit=4096")
    counts = [
        int(c.get("in_msgs", 0)) for c in doc.get("connections") or [] if c.get("name") == name
    ]
    return sum(counts) if counts else None


# --------------------------------------------------------------------------- one run


@dataclass
class Run:
    contender: str
    mode: str  # "max" | "rate"
    repeat: int
    ok: bool = False
    error: str = ""
    frames: int = 0
    window_s: float = 0.0
    cpu_us_per_frame: float = float("nan")
    cpu_percent: float = float("nan")
    quotes_per_s: float = float("nan")
    fake_cpu_percent: float = float("nan")
    nats_cpu_percent: float = float("nan")
    machine_busy_percent: float = float("nan")  # all processes, all cores (100 % = every core)
    other_load_cores: float = float("nan")  # CPU used by processes outside the benchmark, in cores
    rss_mb: float = float("nan")
    latency_samples: int = 0
    read_p50_ms: float = float("nan")
    read_p99_ms: float = float("nan")
    exch_p50_ms: float = float("nan")
    exch_p99_ms: float = float("nan")
    sow_status: dict[str, Any] = field(default_factory=dict)


class LatencySink:
    """Collects (subscriber receive time, relay read time, exchange ts) while ``recording``."""

    def __init__(self, stamps: Callable[[dict[str, Any]], tuple[float, float]]) -> None:
        self.stamps = stamps
        self.recording = False
        self.read_ms: list[float] = []
        self.exch_ms: list[float] = []
        self.errors = 0

    async def on_msg(self, msg: Any) -> None:
        now_us = time.time_ns() / 1000
        if not self.recording:
            return
        try:
            read_us, ts_ms = self.stamps(orjson.loads(msg.data))
        except (KeyError, TypeError, ValueError):
            self.errors += 1
            return
        self.read_ms.append((now_us - read_us) / 1000)
        self.exch_ms.append(now_us / 1000 - ts_ms)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


async def _spawn(
    argv: list[str], env: dict[str, str], log: Path, cwd: Path, stdout_pipe: bool = False
) -> asyncio.subprocess.Process:
    full_env = {k: v for k, v in os.environ.items() if k != "SOW_CONFIG"}
    full_env.update(env)
    full_env["PYTHONPATH"] = str(ROOT)
    fh = log.open("ab")
    try:
        return await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if stdout_pipe else fh,
            stderr=fh,
        )
    finally:
        fh.close()


async def _kill(proc: asyncio.subprocess.Process | None) -> None:
    """Everything is measured by then: no graceful shutdown needed (it only costs time)."""
    if proc is None or proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGKILL)
    await proc.wait()


async def run_one(
    opts: Options,
    contender: Contender,
    mode: str,
    repeat: int,
    nats_url: str,
    monitor_port: int,
    nats_pid: int,
) -> Run:
    import nats

    run = Run(contender.key, mode, repeat)
    rate = 0.0 if mode == "max" else opts.rate
    tag = f"{contender.key}-{mode}-{repeat}"
    fake: asyncio.subprocess.Process | None = None
    relay: asyncio.subprocess.Process | None = None
    nc = await nats.connect(nats_url, name="bench-subscriber")
    sink = LatencySink(contender.stamps)
    status: dict[str, Any] = {}

    async def on_status(msg: Any) -> None:
        status.clear()
        status.update(orjson.loads(msg.data))

    try:
        if mode == "rate":
            await nc.subscribe(contender.subject, cb=sink.on_msg, pending_msgs_limit=1_000_000)
        if contender.key == "sow":
            await nc.subscribe("sow.status.publisher", cb=on_status)
        await nc.flush()
        fake_argv = [opts.python, "-m", "tests.fakes.bybit_ws", "--port", "0", "--rate", str(rate),
                     "--symbols", ",".join(opts.symbols), "--market", "linear"]  # fmt: skip
        if mode == "max":
            fake_argv += ["--frames", str(opts.max_frames)]
        fake = await _spawn(
            fake_argv,
            {},
            opts.workdir / f"fake-{tag}.log",
            ROOT,
            stdout_pipe=True,
        )
        assert fake.stdout is not None
        line = (await asyncio.wait_for(fake.stdout.readline(), 15)).decode().strip()
        if not line.startswith("READY "):
            raise RuntimeError(f"fake exchange did not start: {line!r}")
        ws_base = line.split()[1].rstrip("/")
        argv, env = contender.command(opts, ws_base, nats_url)
        relay = await _spawn(argv, env, opts.workdir / f"{tag}.log", opts.workdir)
        name = contender.nats_name
        deadline = time.monotonic() + 30

        async def count() -> int:
            if relay is not None and relay.returncode is not None:
                raise RuntimeError(f"{contender.key} exited with code {relay.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{contender.key} stalled (see its log)")
            return await published(monitor_port, name) or 0

        if mode == "max":
            # The whole delta stream: from the moment every snapshot is published (connections,
            # handshakes and subscriptions are done; the deltas start right behind the snapshots)
            # until the last delta is published. Counting from mid-stream would be wrong: a relay
            # holds unflushed publishes (nats-py buffers up to its pending_size), so the server's
            # count moves in bursts, and a relay that reads faster than it publishes must pay for
            # its backlog.
            while await count() < len(opts.symbols):
                await asyncio.sleep(0.005)
        else:
            while await count() < len(opts.symbols) + 200:  # every snapshot and then some
                await asyncio.sleep(0.1)
            await asyncio.sleep(opts.warmup_s)
        cpu0, fake0, nats0 = cpu_seconds(relay.pid), cpu_seconds(fake.pid), cpu_seconds(nats_pid)
        self0 = sum(os.times()[:2])
        busy0, all0 = machine_busy_seconds()
        n0, t0 = await count(), time.monotonic()
        n_first, t_first = n0, t0
        sink.recording = True
        if mode == "max":
            expected = len(opts.symbols) + opts.max_frames
            deadline = time.monotonic() + 120
            n1, last_change = n0, time.monotonic()
            while n1 < expected:
                await asyncio.sleep(0.02)
                n, now = await count(), time.monotonic()
                if n != n1:
                    if n1 == n0:  # the first publishes: wall time counts from here
                        n_first, t_first = n, now
                    n1, last_change = n, now
                elif n1 > n0 and now - last_change > 2.0:  # frames lost: measure what came
                    break
        else:
            await asyncio.sleep(opts.latency_window_s)
        cpu1, fake1, nats1 = cpu_seconds(relay.pid), cpu_seconds(fake.pid), cpu_seconds(nats_pid)
        self1 = sum(os.times()[:2])
        busy1, all1 = machine_busy_seconds()
        n1, t1 = await count(), time.monotonic()
        await asyncio.sleep(0.05)  # let the last messages of the window reach the sink
        sink.recording = False
        run.rss_mb = peak_rss_mb(relay.pid)
        run.frames, run.window_s = n1 - n0, t1 - t0
        if run.frames <= 0:
            raise RuntimeError("no messages in the measuring window")
        run.cpu_us_per_frame = (cpu1 - cpu0) / run.frames * 1e6
        run.cpu_percent = (cpu1 - cpu0) / run.window_s * 100
        run.quotes_per_s = (n1 - n_first) / max(1e-9, t1 - t_first)
        run.fake_cpu_percent = (fake1 - fake0) / run.window_s * 100
        run.nats_cpu_percent = (nats1 - nats0) / run.window_s * 100
        run.machine_busy_percent = (busy1 - busy0) / max(1e-9, all1 - all0) * 100
        ours = (cpu1 - cpu0) + (fake1 - fake0) + (nats1 - nats0) + (self1 - self0)
        run.other_load_cores = max(0.0, (busy1 - busy0) - ours) / run.window_s
        if mode == "rate":
            run.latency_samples = len(sink.read_ms)
            run.read_p50_ms = percentile(sink.read_ms, 50)
            run.read_p99_ms = percentile(sink.read_ms, 99)
            run.exch_p50_ms = percentile(sink.exch_ms, 50)
            run.exch_p99_ms = percentile(sink.exch_ms, 99)
        run.ok = True
    except Exception as exc:
        run.error = f"{type(exc).__name__}: {exc}"
    finally:
        await _kill(fake)
        await _kill(relay)
        with contextlib.suppress(Exception):
            await nc.close()
    if status:
        run.sow_status = {
            k: status.get(k)
            for k in (
                "frames_in",
                "quotes_out",
                "published",
                "feed_overflow",
                "nats_dropped",
                "dropped_deltas",
                "invalid_frames",
            )
        }
    return run


# --------------------------------------------------------------------------- reporting


def _median(runs: list[Run], attr: str) -> float:
    values = [getattr(r, attr) for r in runs if r.ok and getattr(r, attr) == getattr(r, attr)]
    return statistics.median(values) if values else float("nan")


def summarize(runs: list[Run], opts: Options) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key in opts.contenders:
        mx = [r for r in runs if r.contender == key and r.mode == "max"]
        rt = [r for r in runs if r.contender == key and r.mode == "rate"]
        ok = [r for r in mx + rt if r.ok]
        out[key] = {
            "label": CONTENDERS[key].label,
            "runs_ok": len(ok),
            "runs": len(mx + rt),
            "errors": sorted({r.error for r in mx + rt if r.error}),
            "cpu_us_per_frame_max": _median(mx, "cpu_us_per_frame"),
            "cpu_percent_max": _median(mx, "cpu_percent"),
            "quotes_per_s_max": _median(mx, "quotes_per_s"),
            "fake_cpu_percent_max": _median(mx, "fake_cpu_percent"),
            "nats_cpu_percent_max": _median(mx, "nats_cpu_percent"),
            "cpu_us_per_frame_rate": _median(rt, "cpu_us_per_frame"),
            "cpu_percent_rate": _median(rt, "cpu_percent"),
            "quotes_per_s_rate": _median(rt, "quotes_per_s"),
            "latency_samples": _median(rt, "latency_samples"),
            "read_to_sub_p50_ms": _median(rt, "read_p50_ms"),
            "read_to_sub_p99_ms": _median(rt, "read_p99_ms"),
            "read_to_sub_p99_ms_best": min(
                (r.read_p99_ms for r in rt if r.ok), default=float("nan")
            ),
            "exch_to_sub_p50_ms": _median(rt, "exch_p50_ms"),
            "exch_to_sub_p99_ms": _median(rt, "exch_p99_ms"),
            "rss_mb_max": max((r.rss_mb for r in ok), default=float("nan")),
            "rss_mb_rate": max((r.rss_mb for r in rt if r.ok), default=float("nan")),
            "other_load_cores": _median(mx + rt, "other_load_cores"),
        }
    for row in out.values():
        for ref in ("cryptofeed", "relay-websockets"):
            for mode in ("max", "rate"):
                base = out.get(ref, {}).get(f"cpu_us_per_frame_{mode}", float("nan"))
                row[f"cpu_ratio_{mode}_vs_{ref}"] = row[f"cpu_us_per_frame_{mode}"] / base
    return out


def targets(summary: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Issue 2's targets for sow (reported, never asserted)."""
    sow = summary.get("sow")
    if not sow:
        return {}

    def le(value: float, limit: float) -> bool | None:
        return None if value != value else bool(value <= limit)

    return {
        "cpu_ratio_max_vs_cryptofeed": sow["cpu_ratio_max_vs_cryptofeed"],
        "cpu_ratio_rate_vs_cryptofeed": sow["cpu_ratio_rate_vs_cryptofeed"],
        "cpu_max_le_half_cryptofeed": le(sow["cpu_ratio_max_vs_cryptofeed"], 0.5),
        "cpu_rate_le_half_cryptofeed": le(sow["cpu_ratio_rate_vs_cryptofeed"], 0.5),
        "p99_ms": sow["read_to_sub_p99_ms"],
        "p99_le_5ms": le(sow["read_to_sub_p99_ms"], 5.0),
        "p99_ms_best_run": sow["read_to_sub_p99_ms_best"],
        "rss_mb_rate": sow["rss_mb_rate"],
        "rss_mb_max_rate": sow["rss_mb_max"],
        "rss_le_80mb": le(max(sow["rss_mb_rate"], sow["rss_mb_max"]), 80.0),
    }


def _fmt(value: float, digits: int = 1, suffix: str = "") -> str:
    if value != value:  # nan
        return "–"
    return f"{value:,.{digits}f}{suffix}"


def print_report(summary: dict[str, dict[str, Any]], opts: Options, goals: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 132))
    rate = f"{opts.rate:,.0f}/s"
    table = Table(
        title=(
            f"Bybit linear tickers -> NATS, {len(opts.symbols)} symbols, median of {opts.repeats} "
            "runs; CPU = relay process µs per published message"
        ),
        title_justify="left",
    )
    table.add_column("relay")
    table.add_column("CPU µs\nmax rate", justify="right")
    table.add_column("× crypto-\nfeed", justify="right")
    table.add_column("× bare\nwebsockets", justify="right")
    table.add_column("quotes/s\nmax rate", justify="right")
    table.add_column("fake\nCPU %", justify="right")
    table.add_column(f"CPU µs\n@ {rate}", justify="right")
    table.add_column(f"× crypto-\nfeed @ {rate}", justify="right")
    table.add_column(f"read→sub ms @ {rate}\np50 / p99\n(best run's p99)", justify="right")
    table.add_column(f"exch→sub ms\np50 / p99\n@ {rate}", justify="right")
    table.add_column(f"RSS MB\n@ {rate} /\nmax rate", justify="right")
    blank = [""] * 10
    for key, contender in CONTENDERS.items():
        if key == "cryptofeed" and opts.cf_requested and opts.cf_version is None:
            table.add_row(contender.label, "not installed", *blank[1:])
            continue
        if key not in opts.contenders:
            continue
        row = summary[key]
        if not row["runs_ok"]:
            table.add_row(row["label"], "failed", *blank[1:])
            continue
        failed = row["runs"] - row["runs_ok"]
        table.add_row(
            row["label"] + (f" ({failed} runs failed)" if failed else ""),
            _fmt(row["cpu_us_per_frame_max"]),
            _fmt(row["cpu_ratio_max_vs_cryptofeed"], 2, "×"),
            _fmt(row["cpu_ratio_max_vs_relay-websockets"], 2, "×"),
            _fmt(row["quotes_per_s_max"], 0),
            _fmt(row["fake_cpu_percent_max"], 0),
            _fmt(row["cpu_us_per_frame_rate"]),
            _fmt(row["cpu_ratio_rate_vs_cryptofeed"], 2, "×"),
            f"{_fmt(row['read_to_sub_p50_ms'], 2)} / {_fmt(row['read_to_sub_p99_ms'], 2)}"
            f" ({_fmt(row['read_to_sub_p99_ms_best'], 2)})",
            f"{_fmt(row['exch_to_sub_p50_ms'], 1)} / {_fmt(row['exch_to_sub_p99_ms'], 1)}",
            f"{_fmt(row['rss_mb_rate'], 0)} / {_fmt(row['rss_mb_max'], 0)}",
        )
    console.print(table)
    console.print(
        "[dim]read→sub: from the relay's own socket-read stamp (sow Quote.recv_us, bare relays' "
        "recv_us, cryptofeed's receipt_timestamp) to the subscriber; exch→sub: from the frame's ts "
        "(the fake's send time, ms) to the subscriber. Quotes/s at max rate is capped by the fake "
        "exchange when its CPU % is near 100. RSS: peak (VmHWM) over the runs; at max rate it "
        "includes the backlog a relay holds when it reads faster than it publishes.[/]"
    )
    if goals:

        def mark(ok: bool | None) -> str:
            return "[yellow]n/a[/]" if ok is None else ("[green]met[/]" if ok else "[red]missed[/]")

        console.print(
            "sow against issue 2's targets: CPU ≤ 0.5× cryptofeed: max rate "
            f"{mark(goals['cpu_max_le_half_cryptofeed'])} "
            f"({_fmt(goals['cpu_ratio_max_vs_cryptofeed'], 2, '×')}), @ {rate} "
            f"{mark(goals['cpu_rate_le_half_cryptofeed'])} "
            f"({_fmt(goals['cpu_ratio_rate_vs_cryptofeed'], 2, '×')}); "
            f"p99 ≤ 5 ms @ {rate}: {mark(goals['p99_le_5ms'])} ({_fmt(goals['p99_ms'], 2)} ms, "
            f"best run {_fmt(goals['p99_ms_best_run'], 2)} ms); "
            f"RSS ≤ 80 MB: {mark(goals['rss_le_80mb'])} ({_fmt(goals['rss_mb_rate'], 0)} MB "
            f"@ {rate}, {_fmt(goals['rss_mb_max_rate'], 0)} MB at max rate)"
        )
    loads = [row["other_load_cores"] for row in summary.values() if "other_load_cores" in row]
    other = statistics.median(loads) if loads else 0.0
    if other > 0.25:
        console.print(
            f"[yellow]other processes kept {other:.2f} of {os.cpu_count()} cores busy during the "
            "measurements (median): throughput and latency are disturbed; CPU µs per frame is the "
            "figure to trust.[/]"
        )
    for key, row in summary.items():
        for err in row.get("errors", []):
            console.print(f"[red]{key}[/]: {err} (logs in {opts.workdir})")


# --------------------------------------------------------------------------- main


def _cryptofeed_version(python: str) -> str | None:
    if not Path(python).exists():
        return None
    try:
        out = subprocess.run(
            [
                python,
                "-c",
                "import cryptofeed, nats, orjson, importlib.metadata as m; "
                "print(m.version('cryptofeed'))",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tempfile.gettempdir(),
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


async def bench(opts: Options) -> dict[str, Any]:
    from rich.console import Console

    console = Console(stderr=True)
    server = await asyncio.to_thread(start_nats, opts.workdir)
    nats_url, monitor = server.nats_url, server.ports["monitor"]
    runs: list[Run] = []
    started = time.monotonic()
    try:
        total = opts.repeats * 2 * len(opts.contenders)
        for repeat in range(opts.repeats):
            for mode in ("max", "rate"):
                for key in opts.contenders:  # interleaved: machine noise hits everyone alike
                    n = len(runs) + 1
                    console.print(
                        f"[dim][{n}/{total}] {key} "
                        f"{'max rate' if mode == 'max' else f'{opts.rate:g}/s'} "
                        f"(repeat {repeat + 1})[/]",
                        end=" ",
                    )
                    run = await run_one(
                        opts, CONTENDERS[key], mode, repeat, nats_url, monitor, server.pid
                    )
                    runs.append(run)
                    if run.ok:
                        extra = f", p99 {run.read_p99_ms:.2f} ms" if mode == "rate" else ""
                        console.print(
                            f"[dim]{run.cpu_us_per_frame:.1f} µs/frame, "
                            f"{run.quotes_per_s:,.0f} msg/s{extra}; CPU % relay "
                            f"{run.cpu_percent:.0f}, fake {run.fake_cpu_percent:.0f}, "
                            f"nats {run.nats_cpu_percent:.0f}, machine "
                            f"{run.machine_busy_percent:.0f}[/]"
                        )
                    else:
                        console.print(f"[red]{run.error}[/]")
    finally:
        await asyncio.to_thread(server.stop)
    summary = summarize(runs, opts)
    goals = targets(summary)
    print_report(summary, opts, goals)
    return {
        "meta": {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "cryptofeed": opts.cf_version,
            "symbols": len(opts.symbols),
            "repeats": opts.repeats,
            "rate": opts.rate,
            "warmup_s": opts.warmup_s,
            "max_frames": opts.max_frames,
            "latency_window_s": opts.latency_window_s,
            "duration_s": round(time.monotonic() - started, 1),
        },
        "summary": summary,
        "targets": goals,
        "runs": [r.__dict__ for r in runs],
    }


def _nan_to_none(value: Any) -> Any:
    """JSON has no NaN: a figure that could not be measured is null."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(v) for v in value]
    return value


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="bench_publish.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--symbols",
        type=int,
        default=50,
        help=f"number of linear symbols (1-{len(SYMBOLS)}, default 50)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per contender and mode (3)")
    parser.add_argument(
        "--rate", type=float, default=2000.0, help="frames/s of the latency runs (2000)"
    )
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="seconds of flow before measuring at --rate (1.0)"
    )
    parser.add_argument(
        "--max-frames",
        type=int,
        default=300_000,
        help="frames the fake sends per max-rate run (300000)",
    )
    parser.add_argument(
        "--latency-window", type=float, default=4.0, help="seconds measured at --rate (4.0)"
    )
    parser.add_argument(
        "--only",
        default=",".join(CONTENDERS),
        help=f"comma-separated contenders (default: all: {','.join(CONTENDERS)})",
    )
    parser.add_argument(
        "--cryptofeed-python",
        default=DEFAULT_CF_PYTHON,
        help="python of a venv with cryptofeed==2.4.1, nats-py, orjson "
        f"(default {DEFAULT_CF_PYTHON})",
    )
    parser.add_argument("--json", type=Path, default=None, help="write all results to this file")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where nats data and process logs go (default: a temp dir)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.symbols <= len(SYMBOLS):
        parser.error(f"--symbols must be between 1 and {len(SYMBOLS)}")
    contenders = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in contenders if c not in CONTENDERS]
    if unknown:
        parser.error(
            f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(CONTENDERS)}"
        )
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sow-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    return Options(
        symbols=list(SYMBOLS[: args.symbols]),
        repeats=args.repeats,
        rate=args.rate,
        warmup_s=args.warmup,
        max_frames=args.max_frames,
        latency_window_s=args.latency_window,
        contenders=contenders,
        python=sys.executable,
        cf_python=args.cryptofeed_python,
        workdir=workdir,
        json_path=args.json,
    )


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    if "cryptofeed" in opts.contenders:
        opts.cf_requested = True
        opts.cf_version = _cryptofeed_version(opts.cf_python)
        if opts.cf_version is None:
            print(
                f"cryptofeed: not installed (no cryptofeed in {opts.cf_python}); skipped",
                file=sys.stderr,
            )
            opts.contenders.remove("cryptofeed")
    if not opts.contenders:
        sys.exit("nothing to run")
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(bench(opts))
    else:
        result = uvloop.run(bench(opts))
    if opts.cf_requested and opts.cf_version is None:
        result["summary"]["cryptofeed"] = {
            "label": CONTENDERS["cryptofeed"].label,
            "installed": False,
        }
    if opts.json_path is not None:
        text = json.dumps(_nan_to_none(result), indent=2, default=str, allow_nan=False)
        opts.json_path.write_text(text + "\n")
        print(f"results written to {opts.json_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
