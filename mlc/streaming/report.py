"""What ``mlc deployments`` shows of a streaming deployment: its topics and consumer lag."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from mlc.domain import Deployment, DeploymentState, Mode, Runtime
from mlc.errors import MLCError
from mlc.streaming.settings import with_secret
from mlc.streaming.topics import group_lag

LAG_TIMEOUT_SECONDS = 3.0
"""A listing should not hang on a broker that is down: it says "unavailable" instead."""


def streaming_view(
    deployment: Deployment, runtime: Runtime | None, *, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """``topics`` (``IN -> OUT``, dead letters in ``dead_letter_topic``) and ``lag`` for one deployment.

    ``lag`` is the consumer group's uncommitted records on the input topic, ``"standby"``
    for a deployment that waits for its promotion, or ``"unavailable: REASON"``.
    """
    details = deployment.details
    view: dict[str, Any] = {
        "topics": f"{details.get('input_topic', '?')} -> {details.get('output_topic', '?')}",
        "dead_letter_topic": details.get("dead_letter_topic"),
        "consumer_group": details.get("consumer_group"),
    }
    if deployment.mode is not Mode.STREAMING:
        return {"topics": None, "lag": None}
    if deployment.state not in (DeploymentState.SERVING, DeploymentState.DEPLOYING):
        view["lag"] = None
        return view
    if details.get("standby"):
        view["lag"] = "standby"
        return view
    if runtime is None or runtime.kafka is None:
        view["lag"] = f"unavailable: runtime {deployment.runtime} has no kafka settings"
        return view
    kafka = runtime.kafka
    try:
        client = with_secret(
            kafka.client_config(), kafka.sasl_password_env, os.environ if environ is None else environ
        )
        found = group_lag(
            client,
            details.get("consumer_group") or kafka.group_for(runtime.name, deployment.model),
            details.get("input_topic") or kafka.input_topic,
            timeout=LAG_TIMEOUT_SECONDS,
        )
        view["lag"] = found.lag
    except (MLCError, ValueError) as exc:
        view["lag"] = f"unavailable: {exc}"
    return view
