#!/bin/sh
# Start PostgreSQL like the official postgres image does, for deploy/postgres/Dockerfile.
#
# On first start (no $PGDATA/PG_VERSION) it runs initdb with $POSTGRES_USER as superuser
# and $POSTGRES_PASSWORD as its password, creates $POSTGRES_DB, runs the *.sh and *.sql
# files of /docker-entrypoint-initdb.d against a server that listens on its Unix socket
# only, then starts the real server in the foreground.
#
# Environment (same names as the official image; PGPORT is read by postgres itself):
#   POSTGRES_PASSWORD          superuser password (required)
#   POSTGRES_USER              superuser name (default postgres)
#   POSTGRES_DB                database created on first start (default $POSTGRES_USER)
#   PGDATA                     data directory (default /var/lib/postgresql/data)
#   PGPORT                     TCP port (default 5432)
#   POSTGRES_LISTEN_ADDRESSES  addresses to listen on (default '*'; the local profile
#                              uses 127.0.0.1 because it runs on the host's network)
set -eu

: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
: "${PGDATA:=/var/lib/postgresql/data}"
: "${PGPORT:=5432}"
: "${POSTGRES_LISTEN_ADDRESSES:=*}"
export POSTGRES_USER POSTGRES_DB PGDATA PGPORT

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "postgres: POSTGRES_PASSWORD is not set; set it to the superuser's password" >&2
        exit 1
    fi
    echo "postgres: initialising $PGDATA for user $POSTGRES_USER"
    pwfile="$(mktemp)"
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    initdb --username="$POSTGRES_USER" --pwfile="$pwfile" --encoding=UTF8 \
        --auth-local=trust --auth-host=scram-sha-256 -D "$PGDATA" >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"

    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
    if [ "$POSTGRES_DB" != "postgres" ]; then
        psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
            -v db="$POSTGRES_DB" <<'SQL'
CREATE DATABASE :"db";
SQL
    fi
    for f in /docker-entrypoint-initdb.d/*; do
        case "$f" in
            *.sh) echo "postgres: running $f"; sh "$f" ;;
            *.sql) echo "postgres: running $f"
                   psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" -f "$f" ;;
            *) ;;
        esac
    done
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    echo "postgres: initialised"
fi

exec postgres -D "$PGDATA" -c listen_addresses="$POSTGRES_LISTEN_ADDRESSES" -p "$PGPORT"
