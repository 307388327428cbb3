#!/usr/bin/env bash
# Fresh machine -> the whole test suite against real Temporal, PostgreSQL and Docker.
# Installs the project, installs/starts a Docker engine and builds the local base image
# when needed (scripts/docker-engine.sh), lints, type-checks, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/docker-engine.sh
if ! command -v docker-compose >/dev/null 2>&1; then
  echo "==> installing docker-compose"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
fi
if ! command -v bwrap >/dev/null 2>&1; then
  # uploaded lifecycle code runs only in a bubblewrap sandbox (workers/sandbox.py), in tests too
  echo "==> installing bubblewrap"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null
fi
if ! command -v nginx >/dev/null 2>&1; then
  # tests/test_tls.py: nginx terminates mutual TLS in front of the Temporal dev server;
  # tests/test_gateway.py: runtime gateways are nginx (a process, or copied into an image)
  echo "==> installing nginx-light"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null
fi
echo "==> ruff"
.venv/bin/ruff check .
echo "==> mypy"
.venv/bin/mypy mlc workflows activities workers lifecycles
echo "==> pytest"
exec .venv/bin/pytest "$@"
