#!/usr/bin/env bash
# Fresh machine -> the example fraud model promoted DEV -> SIT -> UAT -> PROD on the
# embedded stack (Temporal dev server with Web UI on :8233, embedded PostgreSQL, local
# runtimes). Pass --no-yes to approve the gates yourself from another terminal.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/system-deps.sh demo
./scripts/setup.sh
if [ "${1:-}" = "--no-yes" ]; then
  echo "==> approve from another terminal: cd $PWD && . .venv/bin/activate, then run each \`mlc approve\` command printed below"
  exec .venv/bin/mlc demo
fi
exec .venv/bin/mlc demo --yes
