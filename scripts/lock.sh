#!/usr/bin/env bash
# Refresh requirements.lock: every dependency of pyproject.toml (runtime + the `test` extra,
# which pulls in `embedded` and `models`), pinned with hashes, one version of each package
# for every platform and Python 3.11+. scripts/setup.sh installs exactly this file.
# The resolver (uv, pinned here) runs from a throwaway venv, never from .venv.
# Existing pins are kept unless asked: ./scripts/lock.sh --upgrade (everything) or
# ./scripts/lock.sh --upgrade-package typer (one package).
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.8
tool=$(mktemp -d)
trap 'rm -rf "$tool"' EXIT
python3 -m venv "$tool/venv"
"$tool/venv/bin/python" -m pip install --quiet "uv==$UV_VERSION"
"$tool/venv/bin/uv" pip compile pyproject.toml \
  --no-config \
  --extra test \
  --universal \
  --fork-strategy fewest \
  --python-version 3.11 \
  --generate-hashes \
  --custom-compile-command ./scripts/lock.sh \
  --output-file requirements.lock \
  "$@" >/dev/null   # uv also prints the file; its summary goes to stderr
echo "==> wrote requirements.lock"
