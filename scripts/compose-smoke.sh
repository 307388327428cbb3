#!/usr/bin/env bash
# Bring up the local compose profile, check it is healthy, run one lifecycle, tear down.
#
#   scripts/compose-smoke.sh            # build, up, check, (demo), down -v
#   KEEP=1 scripts/compose-smoke.sh     # leave the stack running afterwards
#
# What it does, each step timed:
#   1. checks docker, docker-compose and the base image (scripts/docker-engine.sh makes it),
#      refreshes build/wheelhouse (deploy/make-wheelhouse.sh; seconds when pip's cache is
#      warm) and creates the host folder behind the mlc-home volume;
#   2. builds every image (`docker-compose build`, the first half of `up -d --build`);
#   3. starts the stack (`up -d`); without mlc.cli in the image yet, only postgres,
#      temporal and temporal-init, since `mlc worker` cannot run;
#   4. waits until every started service is healthy and temporal-init exited 0;
#   5. verifies from inside the containers: `temporal operator cluster health`,
#      `pg_isready`, the four Mlc* search attributes, and (with the CLI) the worker's
#      health and `mlc demo --yes` in the worker container;
#   6. `down -v` (this project's containers and volumes only) unless KEEP=1.
#
# Environment:
#   MLC_SMOKE_PROJECT     compose project name (default mlc-smoke; volumes are per project)
#   MLC_BASE_IMAGE        base image (default mlc-python:3.11-bookworm)
#   MLC_PG_PORT, MLC_TEMPORAL_PORT, MLC_TEMPORAL_UI_PORT
#                         127.0.0.1 ports (defaults 55432, 17233, 18233)
#   MLC_HOME_PATH         host folder behind mlc-home (default: a fresh folder under /tmp,
#                         removed at the end unless KEEP=1)
#   MLC_SMOKE_TIMEOUT     seconds to wait for health (default 300)
#   MLC_SMOKE_DEMO_TIMEOUT  seconds `mlc demo --yes` may take (default 600)
#   KEEP                  1 keeps the stack up at the end
set -euo pipefail

cd "$(dirname "$0")/.."
PROJECT="${MLC_SMOKE_PROJECT:-mlc-smoke}"
BASE_IMAGE="${MLC_BASE_IMAGE:-mlc-python:3.11-bookworm}"
TIMEOUT="${MLC_SMOKE_TIMEOUT:-300}"
export MLC_PG_PORT="${MLC_PG_PORT:-55432}"
export MLC_TEMPORAL_PORT="${MLC_TEMPORAL_PORT:-17233}"
export MLC_TEMPORAL_UI_PORT="${MLC_TEMPORAL_UI_PORT:-18233}"
if [ -z "${MLC_HOME_PATH:-}" ]; then
    MLC_HOME_PATH="$(mktemp -d /tmp/mlc-compose-smoke-home.XXXXXX)"
    remove_home=1
else
    remove_home=0
fi
export MLC_HOME_PATH
export DOCKER_GID="${DOCKER_GID:-$(stat -c %g /var/run/docker.sock 2>/dev/null || echo 999)}"

compose() { docker-compose -p "$PROJECT" -f docker-compose.yml -f docker-compose.local.yml "$@"; }
say() { echo "[compose-smoke] $*"; }
die() { echo "[compose-smoke] ERROR: $*" >&2; exit 1; }

timings=()
t_start=0
step_start() { t_start=$(date +%s.%N); say "$1"; }
step_end() {
    local secs
    secs=$(awk -v a="$t_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    timings+=("$(printf '%-34s %7ss' "$1" "$secs")")
}
print_timings() {
    echo "[compose-smoke] timings:"
    local line
    for line in "${timings[@]}"; do echo "  $line"; done
}

teardown() {
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        say "failed (exit $rc); last logs:"
        compose ps || true
        compose logs --tail=40 || true
    fi
    if [ "${KEEP:-0}" = "1" ]; then
        say "KEEP=1: stack left running (project $PROJECT); stop it with:"
        say "  docker-compose -p $PROJECT -f docker-compose.yml -f docker-compose.local.yml down -v"
    else
        step_start "down -v"
        compose down -v --remove-orphans >/dev/null 2>&1 || true
        [ "$remove_home" -eq 0 ] || rm -rf "$MLC_HOME_PATH"
        step_end "down -v"
    fi
    print_timings
    exit "$rc"
}

# --- 1. preconditions -------------------------------------------------------------
command -v docker >/dev/null || die "docker is not installed (scripts/docker-engine.sh installs it)"
command -v docker-compose >/dev/null || die "docker-compose is not installed (apt-get install docker-compose)"
docker info >/dev/null 2>&1 || die "the Docker engine does not answer (scripts/docker-engine.sh starts it)"
docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 \
    || die "base image $BASE_IMAGE is missing; build it with scripts/docker-engine.sh"
step_start "wheelhouse (deploy/make-wheelhouse.sh)"
deploy/make-wheelhouse.sh >/tmp/mlc-compose-smoke-wheelhouse.log 2>&1 \
    || { tail -20 /tmp/mlc-compose-smoke-wheelhouse.log; die "deploy/make-wheelhouse.sh failed"; }
step_end "wheelhouse"
# The worker's unprivileged user (uid 10001 in the Dockerfile) owns MLC_HOME.
install -d -o 10001 -g 10001 "$MLC_HOME_PATH"
trap teardown EXIT

# --- 2. build ---------------------------------------------------------------------
step_start "build images"
compose build --progress plain >/tmp/mlc-compose-smoke-build.log 2>&1 \
    || compose build >/tmp/mlc-compose-smoke-build.log 2>&1 \
    || { tail -40 /tmp/mlc-compose-smoke-build.log; die "build failed (log: /tmp/mlc-compose-smoke-build.log)"; }
step_end "build images"

worker_image="$(compose config | awk '/^  worker:/ { w = 1 } w && /^    image:/ { print $2; exit }')"
if docker run --rm --network none --entrypoint /opt/mlc/bin/python "$worker_image" -c "import mlc.cli" \
    >/dev/null 2>&1; then
    have_cli=1
    services=(postgres temporal temporal-init worker)
else
    have_cli=0
    services=(postgres temporal temporal-init)
    say "mlc.cli is not in $worker_image yet: starting the stack without the worker"
fi

# --- 3. up ------------------------------------------------------------------------
step_start "up -d (${services[*]})"
compose up -d "${services[@]}" >/dev/null
step_end "up -d"

# --- 4. wait for health -----------------------------------------------------------
# Prints healthy/starting/unhealthy/exited:N/absent for a service's container.
service_state() {
    local id
    id="$(compose ps -q "$1" 2>/dev/null | head -n 1)"
    [ -n "$id" ] || { echo absent; return; }
    docker inspect -f '{{if eq .State.Status "exited"}}exited:{{.State.ExitCode}}{{else if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$id"
}

step_start "wait for health"
deadline=$((SECONDS + TIMEOUT))
declare -A healthy_at=()
while :; do
    pending=0
    for svc in "${services[@]}"; do
        [ -n "${healthy_at[$svc]:-}" ] && continue
        state="$(service_state "$svc")"
        case "$svc:$state" in
            temporal-init:exited:0 | *:healthy)
                healthy_at[$svc]=$(awk -v a="$t_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
                say "  $svc: ${state} after ${healthy_at[$svc]}s" ;;
            *:exited:* | *:unhealthy) die "$svc is $state" ;;
            *) pending=1 ;;
        esac
    done
    [ "$pending" -eq 0 ] && break
    [ "$SECONDS" -lt "$deadline" ] || die "not healthy after ${TIMEOUT}s"
    sleep 1
done
step_end "wait for health"
for svc in "${services[@]}"; do
    timings+=("$(printf '  %-32s %7ss' "$svc ready" "${healthy_at[$svc]}")")
done

# --- 5. verify --------------------------------------------------------------------
step_start "verify"
compose exec -T temporal temporal operator cluster health --address "127.0.0.1:$MLC_TEMPORAL_PORT"
compose exec -T postgres pg_isready -h 127.0.0.1 -p "$MLC_PG_PORT"
attrs="$(compose exec -T temporal temporal operator search-attribute list \
    --address "127.0.0.1:$MLC_TEMPORAL_PORT")"
for pair in MlcModel:Keyword MlcVersion:Int MlcStage:Keyword MlcServiceTag:KeywordList; do
    printf '%s\n' "$attrs" | awk -v n="${pair%%:*}" -v t="${pair#*:}" '$1 == n && $2 == t { f = 1 } END { exit !f }' \
        || die "search attribute ${pair%%:*} (${pair#*:}) is not registered"
done
say "search attributes MlcModel, MlcVersion, MlcStage, MlcServiceTag registered"
# Inventory DB reachable with the worker's credentials, over TCP like the worker.
compose exec -T -e PGPASSWORD="${POSTGRES_PASSWORD:-mlc-dev-only}" postgres \
    psql -h 127.0.0.1 -p "$MLC_PG_PORT" -U mlc -d mlc -tAc 'select 1' >/dev/null
say "postgres: mlc database answers over TCP with the worker's credentials"
ui_status="$(python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$MLC_TEMPORAL_UI_PORT/', timeout=5).status)" 2>/dev/null || echo none)"
[ "$ui_status" = "200" ] || die "Web UI at 127.0.0.1:$MLC_TEMPORAL_UI_PORT answered $ui_status"
say "Web UI answers 200 on 127.0.0.1:$MLC_TEMPORAL_UI_PORT"
step_end "verify"

if [ "$have_cli" -eq 1 ]; then
    step_start "mlc demo --yes (worker container)"
    # A failing activity is retried forever, so bound the demo: a hang is a failure.
    timeout "${MLC_SMOKE_DEMO_TIMEOUT:-600}" \
        docker-compose -p "$PROJECT" -f docker-compose.yml -f docker-compose.local.yml \
        exec -T worker mlc demo --yes \
        || die "mlc demo --yes failed or took over ${MLC_SMOKE_DEMO_TIMEOUT:-600}s (worker logs below)"
    step_end "mlc demo --yes"
else
    say "skipped the lifecycle run: no mlc.cli yet"
fi
say "OK"
