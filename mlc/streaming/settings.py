"""The configuration one streaming consumer runs with, and a deployment's test topics.

Plain pydantic models importing only :mod:`mlc.kafka_settings` of the project, because the
consumer imports them inside model containers.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict

from mlc.kafka_settings import KafkaSettings

TEST_TOPIC_PREFIX = "mlc-test."
"""Every deployment's own test topics start with this (``mlc-test.<deployment>.in/.out``)."""


def test_topics(deployment_id: str) -> tuple[str, str]:
    """A deployment's own input and output test topics (stage tests never touch business topics)."""
    return f"{TEST_TOPIC_PREFIX}{deployment_id}.in", f"{TEST_TOPIC_PREFIX}{deployment_id}.out"


test_topics.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def with_secret(
    config: Mapping[str, str], password_env: str | None, environ: Mapping[str, str]
) -> dict[str, str]:
    """``config`` plus ``sasl.password`` read from ``environ[password_env]`` (when one is named).

    Raises:
        ValueError: the variable is named but not set; the message names it.
    """
    full = dict(config)
    if password_env:
        password = environ.get(password_env)
        if password is None:
            raise ValueError(
                f"the Kafka SASL password variable {password_env} is not set in this process's "
                "environment; set it on the runtime worker's host (the runtime's sasl_password_env)"
            )
        full["sasl.password"] = password
    return full


class StreamConfig(BaseModel):
    """Everything one consumer process needs, passed as JSON in ``MLC_STREAM_CONFIG``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    deployment_id: str
    model: str
    version: int
    client: dict[str, str]
    """librdkafka connection settings without secrets."""
    password_env: str | None = None
    group: str
    input_topic: str
    output_topic: str
    dead_letter_topic: str
    test_input_topic: str
    test_output_topic: str
    standby: bool = False
    """Score only the test topics: another version of the model still owns the input topic
    until this one is promoted."""
    max_poll_records: int = 500
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 500

    @classmethod
    def build(
        cls,
        kafka: KafkaSettings,
        *,
        runtime: str,
        deployment_id: str,
        model: str,
        version: int,
        standby: bool,
    ) -> StreamConfig:
        """The consumer configuration of one deployment on a runtime with ``kafka`` settings."""
        test_in, test_out = test_topics(deployment_id)
        return cls(
            deployment_id=deployment_id,
            model=model,
            version=version,
            client=kafka.client_config(),
            password_env=kafka.sasl_password_env,
            group=kafka.group_for(runtime, model),
            input_topic=kafka.input_topic,
            output_topic=kafka.output_topic,
            dead_letter_topic=kafka.dead_letters,
            test_input_topic=test_in,
            test_output_topic=test_out,
            standby=standby,
            max_poll_records=kafka.max_poll_records,
            session_timeout_ms=kafka.session_timeout_ms,
            heartbeat_interval_ms=kafka.heartbeat_interval_ms,
        )
