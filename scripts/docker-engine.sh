#!/usr/bin/env bash
# Make a local Docker engine and the model base image available, from a fresh machine.
#
# The docker runtime's tests and benchmarks need an engine and a Python base image, and
# CI machines start with neither and can reach no image registry. So this script:
#   1. installs docker.io with apt-get when dockerd is absent,
#   2. starts dockerd (no bridge, no iptables: containers use host networking) detached
#      when `docker info` fails, and waits until it answers,
#   3. builds the base image mlc-python:3.11-bookworm with debootstrap from the Debian
#      mirror apt already uses, unless that tag exists.
# Every step is skipped when already done, so running it twice is cheap.
#
# Environment:
#   MLC_BASE_IMAGE     tag to build (default mlc-python:3.11-bookworm)
#   MLC_DEBIAN_SUITE   Debian suite to bootstrap (default bookworm: Python 3.11)
#   MLC_BASE_PACKAGES  comma-separated packages debootstrap includes (default
#                      python3,ca-certificates; tests/test_fresh_machine.py builds its clean
#                      machine with python3,python3-venv,git,ca-certificates)
#   MLC_DOCKERD_LOG    dockerd's log file (default /var/log/mlc-dockerd.log)
set -euo pipefail

BASE_IMAGE="${MLC_BASE_IMAGE:-mlc-python:3.11-bookworm}"
SUITE="${MLC_DEBIAN_SUITE:-bookworm}"
PACKAGES="${MLC_BASE_PACKAGES:-python3,ca-certificates}"
DOCKERD_LOG="${MLC_DOCKERD_LOG:-/var/log/mlc-dockerd.log}"
ENGINE_WAIT_SECONDS=60

say() { echo "[docker-engine] $*"; }
die() { echo "[docker-engine] ERROR: $*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=0
apt_install() {
    if [ "$apt_updated" -eq 0 ]; then
        say "apt-get update"
        as_root apt-get update -qq || die "apt-get update failed; is the Debian mirror reachable?"
        apt_updated=1
    fi
    say "apt-get install $*"
    local log
    log="$(mktemp /tmp/mlc-docker-engine-apt.XXXXXX.log)"
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" \
        >"$log" 2>&1 || die "apt-get install $* failed; last lines of $log:
$(tail -n 20 "$log")"
    rm -f "$log"
}

# Print the first Debian mirror URI apt uses for $SUITE (not the security archive), from
# one-line (*.list) and deb822 (*.sources) files. Empty when none is found.
debian_mirror() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk -v suite="$SUITE" '
            $1 == "deb" {
                i = 2
                if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                if ($(i + 1) == suite) { print $i; exit }
            }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        # deb822: paragraphs separated by blank lines; pick one whose Suites has $SUITE.
        awk -v suite="$SUITE" '
            BEGIN { RS = ""; FS = "\n" }
            {
                uri = ""; ok = 0; deb = 0; enabled = 1
                for (n = 1; n <= NF; n++) {
                    split($n, kv, /:[ \t]*/)
                    key = tolower(kv[1]); value = substr($n, length(kv[1]) + 2)
                    gsub(/^[ \t]+|[ \t]+$/, "", value)
                    if (key == "uris") { split(value, u, /[ \t]+/); uri = u[1] }
                    if (key == "types" && value ~ /(^|[ \t])deb([ \t]|$)/) deb = 1
                    if (key == "enabled" && tolower(value) == "no") enabled = 0
                    if (key == "suites") {
                        m = split(value, s, /[ \t]+/)
                        for (j = 1; j <= m; j++) if (s[j] == suite) ok = 1
                    }
                }
                if (ok && deb && enabled && uri != "") { print uri; exit }
            }' "$f"
    done
}

# --- 1. the engine binaries ---------------------------------------------------------------
if command -v dockerd >/dev/null 2>&1 && command -v docker >/dev/null 2>&1; then
    say "dockerd is installed: $(command -v dockerd)"
else
    command -v apt-get >/dev/null 2>&1 || die "dockerd is missing and apt-get is not available: install Docker by hand"
    apt_install docker.io
fi

# --- 2. a running engine ------------------------------------------------------------------
if docker info >/dev/null 2>&1; then
    say "engine is answering"
else
    say "starting dockerd --bridge=none --iptables=false (log: $DOCKERD_LOG)"
    as_root mkdir -p "$(dirname "$DOCKERD_LOG")"
    # setsid + nohup: the engine must outlive this script and the CI step that ran it.
    as_root setsid nohup dockerd --bridge=none --iptables=false >>"$DOCKERD_LOG" 2>&1 </dev/null &
    for _ in $(seq "$ENGINE_WAIT_SECONDS"); do
        docker info >/dev/null 2>&1 && break
        sleep 1
    done
    docker info >/dev/null 2>&1 \
        || die "dockerd did not answer within ${ENGINE_WAIT_SECONDS}s; last log lines:
$(tail -n 20 "$DOCKERD_LOG" 2>/dev/null)"
    say "engine is answering"
fi

# --- 3. the base image ----------------------------------------------------------------------
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    say "base image $BASE_IMAGE exists"
    exit 0
fi

if ! command -v debootstrap >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "debootstrap is missing and apt-get is not available"
    apt_install debootstrap
fi

mirror="$(debian_mirror | head -n 1)"
if [ -n "$mirror" ]; then
    say "using the Debian mirror apt uses: $mirror"
else
    say "no apt source for suite $SUITE found; debootstrap uses its default mirror"
fi

rootfs="$(mktemp -d /var/tmp/mlc-rootfs.XXXXXX)"
trap 'as_root rm -rf "$rootfs"' EXIT

say "debootstrap --variant=minbase $SUITE ($PACKAGES); takes about a minute"
# shellcheck disable=SC2086 # $mirror is empty or one URI
as_root debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" $mirror \
    >"$rootfs.log" 2>&1 \
    || die "debootstrap failed; last log lines:
$(tail -n 20 "$rootfs.log")"
rm -f "$rootfs.log"

# Keep the image small: package caches and lists are rebuilt by apt if ever needed.
as_root rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*

say "importing $rootfs as $BASE_IMAGE"
as_root tar -C "$rootfs" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$BASE_IMAGE" >/dev/null \
    || die "docker import of $BASE_IMAGE failed"

docker run --rm --network none "$BASE_IMAGE" python3 -c 'import sys; print("python", sys.version.split()[0])' \
    | sed 's/^/[docker-engine] base image has /' \
    || die "$BASE_IMAGE was built but python3 does not run in it"
say "done: $BASE_IMAGE"
