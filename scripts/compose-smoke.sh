#!/usr/bin/env bash
# Bring up the local compose profile, check it is healthy, run one lifecycle from the host
# through the API, tear down.
#
#   scripts/compose-smoke.sh            # build, up, check, (demo), down -v
#   KEEP=1 scripts/compose-smoke.sh     # leave the stack running afterwards
#
# What it does, each step timed:
#   1. checks docker, docker-compose and the base image (scripts/docker-engine.sh makes it),
#      refreshes build/wheelhouse (deploy/make-wheelhouse.sh; seconds when pip's cache is
#      warm) and creates the host folder behind the mlc-home volume;
#   2. builds every image (`docker-compose build`, the first half of `up -d --build`);
#   3. starts everything but the worker (`up -d`): postgres, temporal-schema, temporal,
#      temporal-init and migrate;
#   4. waits until every started service is healthy and the one-shots exited 0;
#   5. bootstraps trust the way docs/team.md tells a team to: a throwaway admin key under
#      MLC_HOME, `mlc admin init smoke-admin` with the owner's DSN in a one-off container of
#      the worker image, then starts the worker with MLC_TRUST_ROOT set to the key id it
#      printed, the lifecycle worker and `mlc server`, and waits until all three are healthy;
#   6. verifies from inside the containers: `temporal operator cluster health`,
#      `pg_isready`, the four Mlc* search attributes, the Web UI, that the worker holds
#      mlc_worker's DSN and the trust root (not the owner's DSN), and that mlc_worker may
#      read the audit trail but not delete from it; that the server answers /healthz, refuses
#      an unsigned /v1/me and answers a signed one as the admin;
#   7. a team member on the HOST, with only the server's URL (MLC_API_URL), the admin's key
#      (MLC_SIGNING_KEY) and a fresh MLC_HOME (`env -i`: no DSN, no TEMPORAL_ADDRESS), does
#      everything through the API: adds one local runtime per stage (the evidence key that
#      `mlc runtime key show` prints in the worker container, a free gateway port), grants
#      itself the approver role, signs policies that let one person approve (as `mlc dev`
#      does), runs `mlc demo --yes` (register, start, approve every gate, serve in PROD at
#      the stable endpoint), checks `mlc status MODEL@VERSION` and runs `mlc audit verify`
#      of the whole trail against the trust root;
#   8. `down -v` (this project's containers and volumes only) unless KEEP=1.
#
# Environment:
#   MLC_SMOKE_PROJECT     compose project name (default mlc-smoke; volumes are per project)
#   MLC_BASE_IMAGE        base image (default mlc-python:3.11-bookworm)
#   MLC_PG_PORT, MLC_TEMPORAL_PORT, MLC_TEMPORAL_UI_PORT, MLC_API_PORT
#                         127.0.0.1 ports (defaults 55432, 17233, 18233, 18280)
#   MLC_HOME_PATH         host folder behind mlc-home (default: a fresh folder under /tmp,
#                         removed at the end unless KEEP=1)
#   MLC_SMOKE_TIMEOUT     seconds to wait for health (default 300)
#   MLC_SMOKE_DEMO_TIMEOUT  seconds `mlc demo --yes` may take (default 600)
#   POSTGRES_PASSWORD, MLC_WORKER_DB_PASSWORD
#                         as in docker-compose.yml (defaults mlc-dev-only, mlc-worker-dev-only)
#   MLC_CLI               the host client's mlc (default .venv/bin/mlc of this checkout)
#   KEEP                  1 keeps the stack up at the end
set -euo pipefail

cd "$(dirname "$0")/.."
PROJECT="${MLC_SMOKE_PROJECT:-mlc-smoke}"
BASE_IMAGE="${MLC_BASE_IMAGE:-mlc-python:3.11-bookworm}"
TIMEOUT="${MLC_SMOKE_TIMEOUT:-300}"
export MLC_PG_PORT="${MLC_PG_PORT:-55432}"
export MLC_TEMPORAL_PORT="${MLC_TEMPORAL_PORT:-17233}"
export MLC_TEMPORAL_UI_PORT="${MLC_TEMPORAL_UI_PORT:-18233}"
export MLC_API_PORT="${MLC_API_PORT:-18280}"
# Clients sign for the URL they call: the server must know it is this one.
export MLC_API_PUBLIC_URL="http://127.0.0.1:$MLC_API_PORT"
if [ -z "${MLC_HOME_PATH:-}" ]; then
    MLC_HOME_PATH="$(mktemp -d /tmp/mlc-compose-smoke-home.XXXXXX)"
    remove_home=1
else
    remove_home=0
fi
export MLC_HOME_PATH
export DOCKER_GID="${DOCKER_GID:-$(stat -c %g /var/run/docker.sock 2>/dev/null || echo 999)}"
export POSTGRES_PASSWORD="${POSTGRES_PASSWORD:-mlc-dev-only}"
export MLC_WORKER_DB_PASSWORD="${MLC_WORKER_DB_PASSWORD:-mlc-worker-dev-only}"
# The worker starts only once the trust root exists (step 5); until then it is unset.
export MLC_TRUST_ROOT=""
OWNER_DSN="postgresql://mlc:$POSTGRES_PASSWORD@127.0.0.1:$MLC_PG_PORT/mlc"
# The throwaway admin's key lives in the throwaway MLC_HOME. A real team keeps admins' keys on
# their own machines, never where a worker can read them (docs/team.md, "Bootstrap trust").
ADMIN_KEY="$MLC_HOME_PATH/smoke-admin/signing-key.pem"

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
        [ -z "${CLIENT_HOME:-}" ] || rm -rf "$CLIENT_HOME"
        [ "$rc" -ne 0 ] || rm -rf "$LOGS"
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
MLC_CLI="${MLC_CLI:-$PWD/.venv/bin/mlc}"
[ -x "$MLC_CLI" ] || die "no mlc at $MLC_CLI for the host client: ./scripts/setup.sh makes .venv (or set MLC_CLI)"
# Logs go to a folder of our own (mktemp: 0700, a random name), never to a fixed name in a
# shared temp dir, where another account could have put a link to a file of root's.
LOGS="$(mktemp -d -t mlc-compose-smoke-logs.XXXXXX)"
step_start "wheelhouse (deploy/make-wheelhouse.sh)"
deploy/make-wheelhouse.sh >"$LOGS/wheelhouse.log" 2>&1 \
    || { tail -20 "$LOGS/wheelhouse.log"; die "deploy/make-wheelhouse.sh failed (log: $LOGS/wheelhouse.log)"; }
step_end "wheelhouse"
# The worker's unprivileged user (uid 10001 in the Dockerfile) owns MLC_HOME.
install -d -o 10001 -g 10001 "$MLC_HOME_PATH"
trap teardown EXIT

# --- 2. build ---------------------------------------------------------------------
step_start "build images"
compose build --progress plain >"$LOGS/build.log" 2>&1 \
    || compose build >"$LOGS/build.log" 2>&1 \
    || { tail -40 "$LOGS/build.log"; die "build failed (log: $LOGS/build.log)"; }
step_end "build images"

# awk reads to the end: leaving early would kill docker-compose with SIGPIPE (exit 141 under pipefail).
worker_image="$(compose config | awk '/^  worker:/ { w = 1 } w && /^    image:/ && !found { print $2; found = 1 }')"
docker run --rm --network none --entrypoint /opt/mlc/bin/python "$worker_image" -c "import cli, server" \
    >/dev/null 2>&1 || die "the cli or server package is not in $worker_image: the image build missed it"
services=(postgres temporal-schema temporal temporal-init migrate)

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

# wait_ready LABEL SERVICE...: until every service is healthy (one-shots: exited 0), timed.
wait_ready() {
    local label="$1" svc state
    shift
    step_start "$label"
    local deadline=$((SECONDS + TIMEOUT))
    declare -A ready_at=()
    while :; do
        local pending=0
        for svc in "$@"; do
            [ -n "${ready_at[$svc]:-}" ] && continue
            state="$(service_state "$svc")"
            case "$svc:$state" in
                temporal-schema:exited:0 | temporal-init:exited:0 | migrate:exited:0 | *:healthy)
                    ready_at[$svc]=$(awk -v a="$t_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
                    say "  $svc: ${state} after ${ready_at[$svc]}s" ;;
                *:exited:* | *:unhealthy) die "$svc is $state" ;;
                *) pending=1 ;;
            esac
        done
        [ "$pending" -eq 0 ] && break
        [ "$SECONDS" -lt "$deadline" ] || die "not healthy after ${TIMEOUT}s"
        sleep 1
    done
    step_end "$label"
    for svc in "$@"; do
        timings+=("$(printf '  %-32s %7ss' "$svc ready" "${ready_at[$svc]}")")
    done
}

wait_ready "wait for health" "${services[@]}"

# --- 5. trust root, then the worker -----------------------------------------------
step_start "admin key + mlc admin init"
# A one-off container of the worker image (its MLC_HOME volume, the host's network), with
# the owner's DSN that the worker itself never gets.
init_out="$(compose run --rm --no-deps -T \
    -e MLC_DATABASE_URL="$OWNER_DSN" -e MLC_SIGNING_KEY="$ADMIN_KEY" \
    --entrypoint sh worker -c '
        [ -f "$MLC_SIGNING_KEY" ] || mlc key create >/dev/null || exit 1
        # A stack kept from an earlier run (KEEP=1, same MLC_HOME_PATH) is initialised already.
        mlc admin init smoke-admin || { echo "already initialised:"; cat "$MLC_HOME/trust-root"; }' 2>&1)" \
    || { printf '%s\n' "$init_out"; die "mlc admin init failed"; }
printf '%s\n' "$init_out" | sed 's/^/  /'
MLC_TRUST_ROOT="$(printf '%s\n' "$init_out" | grep -o 'SHA256:[A-Za-z0-9+/]*' | head -n 1)"
[ -n "$MLC_TRUST_ROOT" ] || die "mlc admin init printed no trust root"
export MLC_TRUST_ROOT
say "trust root $MLC_TRUST_ROOT"
step_end "admin init"

step_start "up -d worker lifecycle-worker server (MLC_TRUST_ROOT set)"
compose up -d --no-deps worker lifecycle-worker server >/dev/null
step_end "up -d workers, server"
wait_ready "wait for the workers and the server" worker lifecycle-worker server

# --- 6. verify --------------------------------------------------------------------
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
# Inventory DB reachable over TCP with the owner's credentials (what migrate used).
compose exec -T -e PGPASSWORD="${POSTGRES_PASSWORD:-mlc-dev-only}" postgres \
    psql -h 127.0.0.1 -p "$MLC_PG_PORT" -U mlc -d mlc -tAc 'select 1' >/dev/null
say "postgres: mlc database answers over TCP with the owner's credentials"
ui_status="$(python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$MLC_TEMPORAL_UI_PORT/', timeout=5).status)" 2>/dev/null || echo none)"
[ "$ui_status" = "200" ] || die "Web UI at 127.0.0.1:$MLC_TEMPORAL_UI_PORT answered $ui_status"
say "Web UI answers 200 on 127.0.0.1:$MLC_TEMPORAL_UI_PORT"
# The worker holds the least-privilege DSN and the trust root, not the owner's DSN.
worker_env="$(compose exec -T worker env)"
printf '%s\n' "$worker_env" | grep -q "^MLC_WORKER_DATABASE_URL=postgresql://mlc_worker:" \
    || die "the worker does not connect as mlc_worker"
printf '%s\n' "$worker_env" | grep -q "^MLC_DATABASE_URL=" && die "the worker holds the owner's DSN"
printf '%s\n' "$worker_env" | grep -qx "MLC_TRUST_ROOT=$MLC_TRUST_ROOT" \
    || die "the worker's MLC_TRUST_ROOT is not $MLC_TRUST_ROOT"
as_worker() {
    compose exec -T -e PGPASSWORD="$MLC_WORKER_DB_PASSWORD" postgres \
        psql -h 127.0.0.1 -p "$MLC_PG_PORT" -U mlc_worker -d mlc -v ON_ERROR_STOP=1 -tAc "$1"
}
as_worker 'SELECT count(*) FROM audit_log' >/dev/null || die "mlc_worker cannot read the audit trail"
if as_worker 'DELETE FROM audit_log' >/dev/null 2>&1; then
    die "mlc_worker may delete from the audit trail"
fi
say "worker: mlc_worker's DSN and MLC_TRUST_ROOT, no owner DSN; mlc_worker reads the trail, cannot delete"
# The API: health, an unsigned request refused, a signed one answered as the admin (the
# worker container as a client: the host network of the local profile, the admin's key).
api_url="$MLC_API_PUBLIC_URL"
python3 - "$api_url" <<'PY' || die "the server at $api_url does not answer /healthz, or answers an unsigned /v1/me"
import json, sys, urllib.error, urllib.request
url = sys.argv[1]
assert json.load(urllib.request.urlopen(f"{url}/healthz", timeout=5)) == {"ok": True}
try:
    urllib.request.urlopen(f"{url}/v1/me", timeout=5)
    sys.exit("an unsigned /v1/me was answered")
except urllib.error.HTTPError as exc:
    assert exc.code == 401, exc.code
PY
me="$(compose exec -T -e MLC_API_URL="$api_url" -e MLC_SIGNING_KEY="$ADMIN_KEY" worker python -c '
import asyncio, os
from cli.api_client import ApiClient
from mlc.trust.keys import load_private_key

async def main():
    async with ApiClient(os.environ["MLC_API_URL"], load_private_key()) as api:
        me = await api.get("/v1/me")
    print(me["name"], me["role"], me["method"])

asyncio.run(main())')" || die "a signed /v1/me failed: $me"
[ "$me" = "smoke-admin admin signature" ] || die "a signed /v1/me answered: $me"
say "server: /healthz ok, unsigned /v1/me 401, signed /v1/me answers smoke-admin (admin)"
step_end "verify"

# --- 7. a team member on the host: only the API's URL and a key --------------------------
# `mlc` from this checkout's .venv, in an environment emptied by `env -i`: no DSN, no
# TEMPORAL_ADDRESS, a fresh MLC_HOME; everything it does is a signed request to the server.
CLIENT_HOME="$(mktemp -d -t mlc-compose-smoke-client.XXXXXX)"
install -m 600 "$ADMIN_KEY" "$CLIENT_HOME/signing-key.pem"
client_env=(env -i PATH="$(dirname "$MLC_CLI"):/usr/local/bin:/usr/bin:/bin" HOME="$CLIENT_HOME"
    LANG=C.UTF-8 MLC_HOME="$CLIENT_HOME/home" MLC_API_URL="$MLC_API_PUBLIC_URL"
    MLC_SIGNING_KEY="$CLIENT_HOME/signing-key.pem")
client() { "${client_env[@]}" "$MLC_CLI" "$@"; }
step_start "runtimes, roles, policies through the API"
# What `mlc dev` sets up for its user (cli/admin.py bootstrap_dev): one local runtime per
# stage on the worker's queue, each with a gateway and the evidence key its worker shows.
read -r -a gateway_ports <<<"$(python3 -c '
import socket
from contextlib import ExitStack
with ExitStack() as stack:
    socks = [stack.enter_context(socket.socket()) for _ in range(4)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    print(*(s.getsockname()[1] for s in socks))')"
i=0
for stage in DEV SIT UAT PROD; do
    runtime="local-${stage,,}"
    evidence="$(compose exec -T worker mlc runtime key show "$runtime" | tail -n 1)"
    [[ "$evidence" == ssh-ed25519\ * ]] || die "the worker showed no evidence key for $runtime: $evidence"
    client runtime add "$runtime" --stage "$stage" --task-queue "${MLC_TASK_QUEUE:-mlc}" \
        --gateway-port "${gateway_ports[$i]}" --evidence-key "$evidence" \
        || die "mlc runtime add $runtime through the API failed"
    i=$((i + 1))
done
# One person plays every role here, as on `mlc dev`: the approver role, and policies that let
# the registrant and starter approve (PROD keeps its default: protected, admitted by UAT).
client user grant smoke-admin --role approver || die "mlc user grant through the API failed"
for stage in DEV SIT UAT; do
    client policy set "$stage" --allow-registrant --allow-starter --allow-uploader \
        || die "mlc policy set $stage through the API failed"
done
client policy set PROD --protected --admitted-by UAT --allow-registrant --allow-starter --allow-uploader \
    || die "mlc policy set PROD through the API failed"
say "host client (MLC_API_URL and a key only): 4 runtimes, the approver role and 4 policies signed over the API"
step_end "runtimes, roles, policies (API)"

step_start "mlc demo --yes (host, through the API)"
# A failing activity is retried forever, so bound the demo: a hang is a failure.
timeout "${MLC_SMOKE_DEMO_TIMEOUT:-600}" "${client_env[@]}" "$MLC_CLI" demo --yes \
    | tee "$LOGS/demo.log" \
    || die "mlc demo --yes failed or took over ${MLC_SMOKE_DEMO_TIMEOUT:-600}s (worker logs below)"
grep -q "using the running stack's API at $MLC_API_PUBLIC_URL" "$LOGS/demo.log" \
    || die "mlc demo did not go through the API at $MLC_API_PUBLIC_URL"
step_end "mlc demo --yes (API)"
step_start "mlc status, mlc audit verify (API)"
ref="$(grep -o 'registered [^ ]*@[0-9]*' "$LOGS/demo.log" | head -n 1 | cut -d' ' -f2)"
[ -n "$ref" ] || die "mlc demo registered no model"
client status "$ref" --json | python3 -c '
import json, sys
found = json.load(sys.stdin)
assert found["state"] == "succeeded" and found["stage"] == "PROD", found
' || die "mlc status $ref does not show it succeeded in PROD"
say "mlc status $ref (API): succeeded in PROD"
client audit verify --trust-root "$MLC_TRUST_ROOT" \
    || die "the audit trail does not verify against $MLC_TRUST_ROOT"
step_end "mlc status, audit verify (API)"
say "OK"
