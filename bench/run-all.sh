#!/usr/bin/env bash
# Every benchmark behind issue 20's (and 21's: api) goals, one after the other, at the settings
# bench/README.md's table was measured with. Each bench's own output (its ratios side by
# side) goes to the terminal and to bench/.work/results/<UTC time>/<bench>.txt, with the
# machine's load before and after. Run it on a quiet machine: nothing else should use the
# cores (each bench interleaves its sides, but a busy neighbour still widens the spread).
#
#   ./bench/run-all.sh              # everything (~40 min on 2 cores)
#   ./bench/run-all.sh scoring load # only those (names below)
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/python ]] || { echo "no .venv: run ./scripts/setup.sh first" >&2; exit 2; }
py=.venv/bin/python
declare -A commands=(
  [scoring]="$py bench/bench_scoring.py --duration 5 --rounds 3"
  [gateway]="$py bench/bench_gateway.py --duration 8 --rounds 5"
  [deploy]="$py bench/bench_deploy.py --runs 7 --records 50000"
  [orchestration]="$py bench/bench_orchestration.py --runs 34"
  [load]="$py bench/bench_load.py --runs 100 --rounds 3"
  [load-online]="$py bench/bench_load.py --online --runs 20 --rounds 3"
  [load-online-one-model]="$py bench/bench_load.py --online --runs 20 --rounds 3 --models 1"
  [streaming]="$py bench/bench_streaming.py --records 50000 --runs 3 --rate 2000"
  [batch]="$py bench/bench_batch.py --records 1000000 --runs 3"
  [density]="$py bench/bench_density.py --models 50"
  [cli]="$py bench/bench_cli.py --runs 20"
  [api]="$py bench/bench_api.py --rate 200 --rounds 5 --warmup 5 --duration 20"
)
order=(scoring gateway deploy orchestration load load-online load-online-one-model streaming batch density cli api)
(($#)) && order=("$@")
out="bench/.work/results/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"
failed=()
for name in "${order[@]}"; do
  command=${commands[$name]:-}
  [[ -n $command ]] || { echo "unknown bench: $name (one of: ${!commands[*]})" >&2; exit 2; }
  {
    echo "==> $name: $command"
    echo "load before: $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%H:%M:%S) UTC"
  } | tee "$out/$name.txt"
  if ! $command 2>&1 | tee -a "$out/$name.txt"; then
    failed+=("$name")
  fi
  echo "load after: $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%H:%M:%S) UTC" | tee -a "$out/$name.txt"
done
echo "==> results in $out"
if ((${#failed[@]})); then
  echo "==> failed: ${failed[*]}" >&2
  exit 1
fi
