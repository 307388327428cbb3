#!/bin/sh
# Prepare a Temporal namespace for mlc: create it if missing, then register the custom search
# attributes mlc's workflows set.
#
# Run by the one-shot `temporal-init` service of both compose profiles, with the `temporal`
# CLI of temporalio/admin-tools (production) or of deploy/temporal/Dockerfile (local, where
# `temporal server start-dev` has already created the namespace, so only the attributes are
# registered). Idempotent: an existing namespace is left as it is and attributes already
# listed are skipped, so it is safe on every `up`. It exits non-zero when an attribute exists
# with another type, or Temporal never answers.
#
# Environment:
#   TEMPORAL_ADDRESS         frontend host:port (default 127.0.0.1:7233)
#   TEMPORAL_NAMESPACE       namespace to prepare (default "default")
#   MLC_NAMESPACE_RETENTION  retention of closed workflows when the namespace is created here
#                            (default 720h; an existing namespace keeps its own)
#   MLC_INIT_WAIT_SECONDS    how long to wait for the frontend, and then for the namespace
#                            (default 120 each)
set -eu
: "${TEMPORAL_ADDRESS:=127.0.0.1:7233}"
: "${TEMPORAL_NAMESPACE:=default}"
: "${MLC_NAMESPACE_RETENTION:=720h}"
: "${MLC_INIT_WAIT_SECONDS:=120}"
export TEMPORAL_ADDRESS

# name=type; keep in step with the workflows' search attribute keys.
ATTRIBUTES="MlcModel=Keyword MlcVersion=Int MlcStage=Keyword MlcServiceTag=KeywordList"

# wait_for WHAT COMMAND...: rerun COMMAND every 2 s until it succeeds or the wait is over.
wait_for() {
    what="$1"
    shift
    waited=0
    until "$@" >/dev/null 2>&1; do
        if [ "$waited" -ge "$MLC_INIT_WAIT_SECONDS" ]; then
            echo "temporal-init: no answer from $what at $TEMPORAL_ADDRESS after" \
                 "${MLC_INIT_WAIT_SECONDS}s; is the temporal service healthy?" >&2
            exit 1
        fi
        sleep 2
        waited=$((waited + 2))
    done
}

wait_for "the cluster" temporal operator cluster health
if temporal operator namespace describe --namespace "$TEMPORAL_NAMESPACE" >/dev/null 2>&1; then
    echo "temporal-init: namespace $TEMPORAL_NAMESPACE exists"
else
    temporal operator namespace create --namespace "$TEMPORAL_NAMESPACE" \
        --retention "$MLC_NAMESPACE_RETENTION" >/dev/null
    echo "temporal-init: created namespace $TEMPORAL_NAMESPACE (retention $MLC_NAMESPACE_RETENTION)"
fi
# A new namespace reaches every frontend's cache within seconds.
wait_for "namespace $TEMPORAL_NAMESPACE" \
    temporal operator search-attribute list --namespace "$TEMPORAL_NAMESPACE"

listing="$(temporal operator search-attribute list --namespace "$TEMPORAL_NAMESPACE")"
for pair in $ATTRIBUTES; do
    name="${pair%%=*}"
    type="${pair#*=}"
    existing="$(printf '%s\n' "$listing" | awk -v n="$name" '$1 == n { print $2 }')"
    if [ -z "$existing" ]; then
        temporal operator search-attribute create --namespace "$TEMPORAL_NAMESPACE" \
            --name "$name" --type "$type" >/dev/null
        echo "temporal-init: created $name ($type) in $TEMPORAL_NAMESPACE"
    elif [ "$existing" = "$type" ]; then
        echo "temporal-init: $name ($type) already registered"
    else
        echo "temporal-init: $name exists as $existing, mlc needs $type; remove it" \
             "(temporal operator search-attribute remove --name $name) and rerun" >&2
        exit 1
    fi
done
