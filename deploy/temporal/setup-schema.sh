#!/bin/sh
# Create Temporal's two PostgreSQL databases and bring their schemas up to date.
#
# Run by the one-shot `temporal-schema` service of docker-compose.yml with temporalio/admin-tools,
# whose tag must equal temporalio/server's (TEMPORAL_VERSION): the versioned schema files under
# /etc/temporal/schema are the ones that server version needs. This is how Temporal's own
# compose files set up a `temporalio/server` (which, unlike the deprecated auto-setup image,
# never touches its schema):
#   temporal-sql-tool ... create-database       # no-op when the database exists
#   temporal-sql-tool ... setup-schema -v 0.0   # version tables only; skipped once versioned
#   temporal-sql-tool ... update-schema -d DIR  # applies the versions not yet applied
# so it is safe on every `up`, and after an image upgrade it migrates forward. Temporal's schema
# only moves forward: upgrade one minor version at a time (docs/team.md, "Versions").
#
# Environment (the same names the server reads; all but POSTGRES_PWD have defaults):
#   POSTGRES_SEEDS      PostgreSQL host (default postgres)
#   DB_PORT             its port (default 5432)
#   POSTGRES_USER       login role with CREATEDB (default temporal)
#   POSTGRES_PWD        its password (required)
#   DB                  SQL plugin (default postgres12)
#   DBNAME              default store database (default temporal)
#   VISIBILITY_DBNAME   visibility store database (default temporal_visibility)
#   MLC_INIT_WAIT_SECONDS  how long to wait for PostgreSQL (default 120)
#   MLC_TEMPORAL_SCHEMA_ROOT  PostgreSQL schema files of the image
#                       (default /etc/temporal/schema/postgresql/v12, admin-tools' own)
set -eu
: "${POSTGRES_SEEDS:=postgres}"
: "${DB_PORT:=5432}"
: "${POSTGRES_USER:=temporal}"
: "${DB:=postgres12}"
: "${DBNAME:=temporal}"
: "${VISIBILITY_DBNAME:=temporal_visibility}"
: "${MLC_INIT_WAIT_SECONDS:=120}"
: "${MLC_TEMPORAL_SCHEMA_ROOT:=/etc/temporal/schema/postgresql/v12}"
if [ -z "${POSTGRES_PWD:-}" ]; then
    echo "temporal-schema: POSTGRES_PWD is not set (the password of $POSTGRES_USER)" >&2
    exit 1
fi
# temporal-sql-tool reads the password from SQL_PASSWORD, so it stays off the command line.
SQL_PASSWORD="$POSTGRES_PWD"
export SQL_PASSWORD

sql_tool() {
    temporal-sql-tool --plugin "$DB" --ep "$POSTGRES_SEEDS" -p "$DB_PORT" -u "$POSTGRES_USER" "$@"
}

waited=0
until nc -z "$POSTGRES_SEEDS" "$DB_PORT" >/dev/null 2>&1; do
    if [ "$waited" -ge "$MLC_INIT_WAIT_SECONDS" ]; then
        echo "temporal-schema: PostgreSQL at $POSTGRES_SEEDS:$DB_PORT did not answer in" \
             "${MLC_INIT_WAIT_SECONDS}s" >&2
        exit 1
    fi
    sleep 2
    waited=$((waited + 2))
done

# database name, then the folder of its versioned schema under $MLC_TEMPORAL_SCHEMA_ROOT
for pair in "$DBNAME:temporal" "$VISIBILITY_DBNAME:visibility"; do
    database="${pair%%:*}"
    schema_dir="$MLC_TEMPORAL_SCHEMA_ROOT/${pair#*:}/versioned"
    [ -d "$schema_dir" ] || {
        echo "temporal-schema: no schema folder $schema_dir in this image; is it temporalio/admin-tools?" >&2
        exit 1
    }
    echo "temporal-schema: $database <- $schema_dir"
    sql_tool --db "$database" create-database
    sql_tool --db "$database" setup-schema -v 0.0
    sql_tool --db "$database" update-schema -d "$schema_dir"
done
echo "temporal-schema: $DBNAME and $VISIBILITY_DBNAME are up to date"
