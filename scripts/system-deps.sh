#!/usr/bin/env bash
# What mlc needs from the system (not from pip), checked and installed from this one place.
#
#   scripts/system-deps.sh demo   # what ./scripts/demo.sh needs (the embedded stack)
#   scripts/system-deps.sh test   # demo's, plus what ./scripts/test.sh needs
#
#   demo: python3-venv   scripts/setup.sh creates .venv with `python3 -m venv`
#         nginx-light    runtime gateways (the models' stable endpoints) are nginx processes
#         bubblewrap     uploaded lifecycle code runs only in a bubblewrap sandbox
#   test: docker-compose tests/test_compose.py and scripts/compose-smoke.sh
#         debootstrap    builds the local base images (tests/test_fresh_machine.py's too)
#         chromium       tests/test_web.py drives the web page with Playwright (/usr/bin/chromium)
#         a Docker engine and the base image mlc-python:3.11-bookworm: scripts/docker-engine.sh
#
# Every piece already present is left alone, so a second run only checks (a fraction of a
# second). Installing needs root and apt-get (Debian, Ubuntu): without them the script
# changes nothing and prints one line per missing piece with the command that installs it,
# then exits 2.
#
# Environment:
#   MLC_NGINX        an nginx binary to use instead of the system's (then nginx-light is not needed)
#   MLC_BASE_IMAGE   the base image (default mlc-python:3.11-bookworm), as in scripts/docker-engine.sh
set -euo pipefail
cd "$(dirname "$0")/.."

profile="${1:-demo}"
case "$profile" in
    demo | test) ;;
    *) echo "usage: scripts/system-deps.sh demo|test" >&2; exit 64 ;;
esac
BASE_IMAGE="${MLC_BASE_IMAGE:-mlc-python:3.11-bookworm}"

say() { echo "[system-deps] $*"; }
# A program that is there and executable (bash's `command -v` also names a file on PATH that
# is not executable when it finds nothing better).
have() {
    local found
    { found="$(command -v "$1" 2>/dev/null)" && [ -x "$found" ]; } || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]
}

packages=()   # Debian packages to install
pieces=()     # one "what (package): why" per package
engine=0      # 1: scripts/docker-engine.sh has work to do
socket=""     # the Docker engine's socket, when it is there but this user may not use it

# need WHAT PACKAGE WHY: WHAT is missing; Debian's PACKAGE provides it.
need() { packages+=("$2"); pieces+=("$1 ($2): $3"); }

if [ ! -x .venv/bin/python ] && ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    need "python3 -m venv" python3-venv "scripts/setup.sh creates .venv with \`python3 -m venv\`"
fi
if [ -z "${MLC_NGINX:-}" ] && ! have nginx; then
    need nginx nginx-light "runtime gateways (the models' stable endpoints) are nginx processes"
fi
have bwrap || need bwrap bubblewrap "uploaded lifecycle code runs only in a bubblewrap sandbox"
if [ "$profile" = test ]; then
    have docker-compose || need docker-compose docker-compose "tests/test_compose.py and scripts/compose-smoke.sh"
    have debootstrap || need debootstrap debootstrap "builds the local base images (tests/test_fresh_machine.py's too)"
    [ -x /usr/bin/chromium ] || need chromium chromium "tests/test_web.py drives the web page with Playwright"
    if ! docker info >/dev/null 2>&1 || ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        engine=1
        at="${DOCKER_HOST:-unix:///var/run/docker.sock}"
        if [[ "$at" == unix://* ]] && [ -S "${at#unix://}" ] && [ ! -w "${at#unix://}" ]; then
            socket="${at#unix://}"
        fi
    fi
fi

if [ "${#packages[@]}" -eq 0 ] && [ "$engine" -eq 0 ]; then
    say "everything $profile needs is installed"
    exit 0
fi

# --- without root or apt-get: say what is missing and how to get it, change nothing ---------
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    if have sudo; then sudo="sudo "; else sudo="(as root) "; fi
fi
if [ -n "$sudo" ] || ! have apt-get; then
    for i in "${!packages[@]}"; do
        if have apt-get; then
            how="${sudo}apt-get install ${packages[$i]}"
        else
            how="your system's package manager (Debian's package: ${packages[$i]})"
        fi
        echo "missing ${pieces[$i]}; install: ${how}" >&2
    done
    if [ -n "$socket" ]; then
        group="$(stat -c %G "$socket")"
        echo "missing access to the Docker engine's socket $socket (group $group) for $(id -un):" \
            "${sudo}usermod -aG $group $(id -un), then log in again; or run the tests as root" >&2
    elif [ "$engine" -eq 1 ]; then
        echo "missing a Docker engine answering \`docker info\` for this user, or the base image" \
            "$BASE_IMAGE; install: ${sudo}./scripts/docker-engine.sh" >&2
    fi
    echo "[system-deps] nothing was changed; run the commands above, or this script as root" >&2
    exit 2
fi

# --- as root with apt-get: install what is missing -------------------------------------------
if [ "${#packages[@]}" -gt 0 ]; then
    say "installing with apt-get, because:"
    for piece in "${pieces[@]}"; do say "  $piece"; done
    log="$(mktemp /tmp/mlc-system-deps.XXXXXX.log)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${packages[@]}"; } >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        echo "[system-deps] apt-get install ${packages[*]} failed (log: $log)" >&2
        exit 1
    fi
    rm -f "$log"
    # Debian's nginx package starts its default site on port 80 under systemd. mlc runs
    # nginx processes of its own and needs no system-wide web server listening.
    if [[ " ${packages[*]} " == *" nginx-light "* ]] && have systemctl \
        && systemctl is-active --quiet nginx 2>/dev/null; then
        systemctl disable --now nginx >/dev/null 2>&1 || true
        say "stopped and disabled the nginx service the package started on port 80 (mlc runs its own)"
    fi
    say "installed ${packages[*]}"
fi
if [ "$engine" -eq 1 ]; then
    say "a Docker engine and the base image $BASE_IMAGE: scripts/docker-engine.sh"
    ./scripts/docker-engine.sh
fi
