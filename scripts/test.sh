#!/usr/bin/env bash
# Fresh machine -> the whole test suite against real Temporal, PostgreSQL and Docker.
# Installs what the system lacks (scripts/system-deps.sh test: nginx, bubblewrap,
# docker-compose, debootstrap, a Docker engine and the local base image), then the project,
# lints, type-checks, and runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/system-deps.sh test
./scripts/setup.sh
echo "==> ruff"
.venv/bin/ruff check .
echo "==> mypy"
.venv/bin/mypy mlc workflows activities workers lifecycles server cli
echo "==> pytest"
exec .venv/bin/pytest "$@"
