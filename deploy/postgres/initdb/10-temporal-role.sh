#!/bin/sh
# Create the login role Temporal uses (docker-compose.yml), on the first start of the postgres
# service only. CREATEDB lets the temporal-schema one-shot (temporal-sql-tool) create
# Temporal's own databases (temporal, temporal_visibility), which the role then owns and the
# temporal server logs in to; the role owns nothing of the mlc inventory.
#
# Run by the official postgres image and by deploy/postgres/entrypoint.sh alike.
# Environment: TEMPORAL_DB_USER (default temporal), TEMPORAL_DB_PASSWORD (required),
# and the image's POSTGRES_USER / POSTGRES_DB.
set -eu
: "${TEMPORAL_DB_USER:=temporal}"
if [ -z "${TEMPORAL_DB_PASSWORD:-}" ]; then
    echo "10-temporal-role.sh: TEMPORAL_DB_PASSWORD is not set; not creating role $TEMPORAL_DB_USER" >&2
    exit 1
fi
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v role="$TEMPORAL_DB_USER" -v pw="$TEMPORAL_DB_PASSWORD" <<'SQL'
CREATE ROLE :"role" LOGIN CREATEDB PASSWORD :'pw';
SQL
echo "10-temporal-role.sh: role $TEMPORAL_DB_USER created"
