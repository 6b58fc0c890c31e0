#!/usr/bin/env bash
# The web dashboard's checks: install from the lock file, lint, typecheck, unit tests, static export.
# The export (frontend/out) is what `sow serve-api` serves at /market and what the browser
# end-to-end test (tests/test_frontend_e2e.py, run with the Python tests) drives.
set -euo pipefail
cd "$(dirname "$0")/../frontend"
export NEXT_TELEMETRY_DISABLED=1 CI=1
start=$(date +%s)

# The browser test (tests/test_frontend_e2e.py) drives Debian's Chromium; never a downloaded one.
if [ ! -x "${CHROMIUM_PATH:-/usr/bin/chromium}" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
npm ci --no-audit --no-fund
npm run lint
npm run typecheck
npm run test
npm run build
echo "frontend: finished in $(( $(date +%s) - start ))s"
