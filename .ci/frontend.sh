#!/usr/bin/env bash
# Install the web dashboard's dependencies from the lock file and build its static export
# (frontend/out: what `sow serve-api` serves at /market and what the browser end-to-end test
# drives). Skips what is already up to date. Its lint, typecheck and unit tests run in
# scripts/check with the rest of the tests.
set -euo pipefail
cd "$(dirname "$0")/../frontend"
export NEXT_TELEMETRY_DISABLED=1
start=$(date +%s)

# The browser test (tests/test_frontend_e2e.py) drives Debian's Chromium; never a downloaded one.
if [ ! -x "${CHROMIUM_PATH:-/usr/bin/chromium}" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
if ! command -v npm >/dev/null; then
  echo "frontend: npm not found (install Node.js 20+); the dashboard is not built" >&2
  exit 0
fi
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund
fi
if [ ! -d out ] || [ -n "$(find app components hooks lib store types public next.config.* package.json \
      -newer out -print -quit 2>/dev/null)" ]; then
  npm run build
fi
echo "frontend: ready in $(( $(date +%s) - start ))s"
