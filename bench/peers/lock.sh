#!/usr/bin/env bash
# Refresh the peers' locks for bench/bench_scoring.py: bench/peers/NAME.lock from NAME.in,
# every transitive package pinned with hashes for this Python (3.11, Linux). scikit-learn,
# numpy, scipy and joblib are held at requirements.lock's versions, so every server scores
# with the same library code. The resolver is the uv that scripts/lock.sh pins, run from a
# throwaway venv. bench_scoring.py installs a lock with pip --require-hashes and rebuilds a
# peer's venv whenever its lock's digest changes.
#   ./bench/peers/lock.sh                # both peers
#   ./bench/peers/lock.sh mlserver       # one
set -euo pipefail
cd "$(dirname "$0")/../.."
UV_VERSION=$(sed -n 's/^UV_VERSION=//p' scripts/lock.sh)
tool=$(mktemp -d)
trap 'rm -rf "$tool"' EXIT
python3 -m venv "$tool/venv"
"$tool/venv/bin/python" -m pip install --quiet "uv==$UV_VERSION"
# The shared scientific stack, at our versions (a requirements.lock line is "name==version \").
{
  echo "# requirements.lock's versions of the stack every server scores with (written by lock.sh)"
  grep -E '^(scikit-learn|numpy|scipy|joblib)==' requirements.lock | sed 's/ *\\$//'
} > bench/peers/shared.txt
peers=("$@")
[ ${#peers[@]} -gt 0 ] || peers=(mlserver mlflow)
for peer in "${peers[@]}"; do
  "$tool/venv/bin/uv" pip compile "bench/peers/$peer.in" --constraint bench/peers/shared.txt \
    --no-config \
    --python-version 3.11 \
    --python-platform x86_64-unknown-linux-gnu \
    --generate-hashes \
    --custom-compile-command "./bench/peers/lock.sh $peer" \
    --output-file "bench/peers/$peer.lock" >/dev/null
  echo "==> wrote bench/peers/$peer.lock"
done
