#!/bin/sh
# Run `temporal server start-dev` for the local compose profile (deploy/temporal/Dockerfile).
#
# Environment:
#   TEMPORAL_IP        address the frontend and the Web UI bind to (default 127.0.0.1)
#   TEMPORAL_PORT      frontend gRPC port (default 7233; the local profile uses 17233)
#   TEMPORAL_UI_PORT   Web UI port (default TEMPORAL_PORT + 1000; the local profile: 18233)
#   TEMPORAL_DB_FILE   SQLite file, keep it on a volume (default /var/lib/temporal/temporal.db)
#   TEMPORAL_NAMESPACE extra namespace to create besides "default" (default: none)
# Extra arguments are passed on to start-dev (e.g. --dynamic-config-value K=V).
set -eu
: "${TEMPORAL_IP:=127.0.0.1}"
: "${TEMPORAL_PORT:=7233}"
: "${TEMPORAL_UI_PORT:=$((TEMPORAL_PORT + 1000))}"
: "${TEMPORAL_DB_FILE:=/var/lib/temporal/temporal.db}"

set -- --ip "$TEMPORAL_IP" --port "$TEMPORAL_PORT" --ui-port "$TEMPORAL_UI_PORT" \
    --db-filename "$TEMPORAL_DB_FILE" "$@"
if [ -n "${TEMPORAL_NAMESPACE:-}" ] && [ "$TEMPORAL_NAMESPACE" != "default" ]; then
    set -- --namespace "$TEMPORAL_NAMESPACE" "$@"
fi
echo "temporal: start-dev on $TEMPORAL_IP:$TEMPORAL_PORT (UI :$TEMPORAL_UI_PORT), SQLite $TEMPORAL_DB_FILE"
exec temporal server start-dev "$@"
