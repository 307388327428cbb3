"""What every runtime kind's streaming deployments share: the Kafka side.

A streaming deployment is one or more long-running consumers (``python -m mlc.streaming
consume``; see :mod:`mlc.streaming.consumer`) scoring the runtime's input topic into its
output topic, in the consumer group every version of the model on that runtime shares.
Locally each consumer is a child process (:mod:`activities.runtimes.local.streaming`); on
docker runtimes a container (:mod:`activities.runtimes.docker.streaming`).

Deploying creates the topics the runtime is allowed to create and the deployment's own
test topics, starts the missing consumers and returns once each has loaded the model
and said it is ready. Redeploying the same deployment keeps consumers that run with the
same configuration and snapshot and restarts dead ones (after a ``kill -9``, say), so it
is idempotent; a changed configuration (``standby`` lifted at promotion) restarts them
all, each stopped cleanly first: SIGTERM lets a consumer finish its batch, commit and
leave the group, so the next one starts exactly at the committed offsets.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from activities.runtimes.base import StreamingDeployRequest
from mlc.domain import Runtime
from mlc.errors import DeploymentFailedError
from mlc.kafka_settings import KafkaSettings
from mlc.streaming.settings import StreamConfig, test_topics, with_secret
from mlc.streaming.topics import delete_topics, ensure_topics, wait_until_settled

READY_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 30.0
"""A consumer finishes its batch (at most ``DELIVERY_TIMEOUT_SECONDS`` of acknowledgements),
commits and leaves its group within this; then it is killed (and its batch redelivered)."""
QUICK_STOP_SECONDS = 5.0

log = logging.getLogger(__name__)


def kafka_of(runtime: Runtime) -> KafkaSettings:
    """The runtime's ``kafka`` settings, or an error saying how to add them."""
    if runtime.kafka is None:
        raise DeploymentFailedError(
            f"runtime {runtime.name} has no kafka settings; add them with `mlc runtime add "
            f"{runtime.name} --replace --mode streaming --kafka-bootstrap HOST:PORT --input-topic IN "
            "--output-topic OUT ...`"
        )
    return runtime.kafka


def stream_config(request: StreamingDeployRequest) -> StreamConfig:
    """The consumers' configuration for a granted deployment."""
    return StreamConfig.build(
        kafka_of(request.runtime),
        runtime=request.runtime.name,
        deployment_id=request.deployment_id,
        model=request.snapshot.model,
        version=request.snapshot.version,
        standby=request.standby,
    )


async def prepare_topics(kafka: KafkaSettings, config: StreamConfig, environ: dict[str, str]) -> None:
    """Create the business topics (when the runtime may) and the deployment's test topics."""
    client = _client(kafka, environ)
    topics = {config.test_input_topic: 1, config.test_output_topic: 1}
    if kafka.create_topics:
        topics.update(
            {
                config.input_topic: kafka.partitions,
                config.output_topic: kafka.partitions,
                config.dead_letter_topic: kafka.partitions,
            }
        )
    await asyncio.to_thread(ensure_topics, client, topics, replication_factor=kafka.replication_factor)


async def drop_test_topics(runtime: Runtime, deployment_id: str) -> None:
    """Delete a deployment's test topics; a broker that cannot be reached only leaves them behind."""
    if runtime.kafka is None:
        return
    try:
        client = _client(runtime.kafka, dict(os.environ))
        await asyncio.to_thread(delete_topics, client, list(test_topics(deployment_id)))
    except Exception as exc:  # undeploy must not fail over leftovers of a few test records
        log.warning("could not delete the test topics of %s: %s", deployment_id, exc)


def _client(kafka: KafkaSettings, environ: dict[str, str]) -> dict[str, str]:
    """Connection settings with the SASL password from ``environ`` (the worker's own)."""
    try:
        return with_secret(kafka.client_config(), kafka.sasl_password_env, environ)
    except ValueError as exc:
        raise DeploymentFailedError(str(exc)) from None


def endpoint_of(config: StreamConfig) -> str:
    """How ``mlc deployments`` shows where a streaming deployment reads: ``kafka://BROKERS/TOPIC``."""
    return f"kafka://{config.client['bootstrap.servers']}/{config.input_topic}"


def result_details(config: StreamConfig, **extra: Any) -> dict[str, Any]:
    """Deployment details every driver records for a streaming deployment."""
    return {
        "input_topic": config.input_topic,
        "output_topic": config.output_topic,
        "dead_letter_topic": config.dead_letter_topic,
        "consumer_group": config.group,
        "test_topics": [config.test_input_topic, config.test_output_topic],
        "standby": config.standby,
        **extra,
    }


# --- the local runtime ---------------------------------------------------------------------


Stop = Callable[[], Awaitable[None]]


async def stop_in_turn(stops: list[Stop], config: StreamConfig, *, leaving: bool = False) -> None:
    """Stop consumers one at a time, letting their group settle after each departure.

    ``leaving``: others of the deployment keep running, so the group must settle after the
    last of these too. Standby consumers are in no group. See
    :func:`mlc.streaming.topics.wait_until_settled` for why.
    """
    for index, stop in enumerate(stops):
        await stop()
        if (leaving or index < len(stops) - 1) and not config.standby:
            try:
                client = with_secret(config.client, config.password_env, os.environ)
            except ValueError:
                client = dict(config.client)
            if not await asyncio.to_thread(wait_until_settled, client, config.group):
                log.warning("consumer group %s did not settle after a consumer stopped", config.group)
