#!/bin/sh
# Register the custom search attributes mlc's workflows set, once per namespace.
#
# Run by the one-shot `temporal-init` service of both compose profiles, with the `temporal`
# CLI of temporalio/admin-tools (production) or of deploy/temporal/Dockerfile (local).
# Idempotent: attributes already listed are skipped, so it is safe on every `up`. It exits
# non-zero when an attribute exists with another type, or Temporal never answers.
#
# Environment:
#   TEMPORAL_ADDRESS    frontend host:port (default 127.0.0.1:7233)
#   TEMPORAL_NAMESPACE  namespace to register them in (default "default")
#   MLC_INIT_WAIT_SECONDS  how long to wait for the frontend (default 120)
set -eu
: "${TEMPORAL_ADDRESS:=127.0.0.1:7233}"
: "${TEMPORAL_NAMESPACE:=default}"
: "${MLC_INIT_WAIT_SECONDS:=120}"
export TEMPORAL_ADDRESS

# name=type; keep in step with the workflows' search attribute keys.
ATTRIBUTES="MlcModel=Keyword MlcVersion=Int MlcStage=Keyword MlcServiceTag=KeywordList"

waited=0
until temporal operator search-attribute list --namespace "$TEMPORAL_NAMESPACE" >/dev/null 2>&1; do
    if [ "$waited" -ge "$MLC_INIT_WAIT_SECONDS" ]; then
        echo "temporal-init: no answer from namespace $TEMPORAL_NAMESPACE at $TEMPORAL_ADDRESS" \
             "after ${MLC_INIT_WAIT_SECONDS}s; is the temporal service healthy?" >&2
        exit 1
    fi
    sleep 2
    waited=$((waited + 2))
done

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
