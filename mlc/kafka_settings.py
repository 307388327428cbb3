"""A runtime's ``kafka`` settings: where its streaming deployments read and write, and how
they connect.

Part of the runtime record (:class:`mlc.domain.Runtime`), and read by the streaming consumer
inside model containers, so it imports only pydantic. Secrets never appear here: runtime
settings are signed statements kept in the audit trail, so the SASL password is named by the
environment variable that holds it on the runtime worker's host (``sasl_password_env``), and
the consumer reads that variable itself.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _topic(value: str) -> str:
    if not _TOPIC.fullmatch(value) or value in (".", ".."):
        raise ValueError(f"topic {value!r} is not valid: use letters, digits, '.', '_' or '-' (at most 249)")
    return value


class KafkaSettings(BaseModel):
    """Where a streaming runtime reads and writes, and how it connects.

    ``mlc runtime add NAME --mode streaming --kafka-bootstrap HOST:PORT --input-topic IN
    --output-topic OUT`` sets the required fields; the rest have working defaults.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    bootstrap_servers: str
    """``host:port[,host:port...]`` of the brokers (``bootstrap.servers``)."""
    input_topic: str
    output_topic: str
    dead_letter_topic: str | None = None
    """Records failing validation or scoring, with the reason; default ``<input_topic>.dead-letter``."""
    consumer_group: str | None = None
    """Shared by every instance *and every version* of a model on this runtime, so a new
    version continues from the old one's committed offsets; default
    ``mlc.<runtime>.<model>``. ``{model}`` in the value is replaced by the model's name."""
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password_env: str | None = None
    """Name of the environment variable holding the SASL password on the runtime worker's
    host (and, for the CLI's lag column, on yours); never the password itself."""
    ssl_ca_location: str | None = None
    ssl_certificate_location: str | None = None
    ssl_key_location: str | None = None
    create_topics: bool = True
    """Create missing input, output and dead-letter topics at deploy (off where an
    administrator owns topics)."""
    partitions: int = Field(default=3, ge=1, le=1000)
    """Partitions of the topics the runtime creates: the most consumers that share the work."""
    replication_factor: int = Field(default=1, ge=1, le=10)
    instances: int = Field(default=1, ge=1, le=64)
    """Consumers per deployment (processes or containers), sharing the consumer group."""
    max_poll_records: int = Field(default=500, ge=1, le=100_000)
    """At most this many records are scored by one ``score_batch`` call."""
    session_timeout_ms: int = Field(default=6000, ge=1000)
    """How soon the group notices a dead consumer and hands its partitions to the others."""
    heartbeat_interval_ms: int = Field(default=500, ge=100)
    test_timeout_seconds: float = Field(default=60.0, gt=0)
    """How long a stage test waits for the outputs of what it produced."""

    @field_validator("input_topic", "output_topic", "dead_letter_topic")
    @classmethod
    def _valid_topic(cls, value: str | None) -> str | None:
        return None if value is None else _topic(value)

    @field_validator("sasl_password_env")
    @classmethod
    def _valid_env(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.fullmatch(value):
            raise ValueError(f"sasl_password_env {value!r} must be an environment variable's name")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> KafkaSettings:
        if not self.bootstrap_servers.strip():
            raise ValueError("bootstrap_servers is empty: give host:port of at least one broker")
        topics = {self.input_topic, self.output_topic, self.dead_letters}
        if len(topics) != 3:
            raise ValueError(
                f"input, output and dead-letter topics must differ, got {self.input_topic}, "
                f"{self.output_topic}, {self.dead_letters}"
            )
        if self.security_protocol.startswith("SASL") and (
            self.sasl_mechanism is None or self.sasl_username is None or self.sasl_password_env is None
        ):
            raise ValueError(
                f"security_protocol {self.security_protocol} needs sasl_mechanism, sasl_username and "
                "sasl_password_env"
            )
        return self

    @property
    def dead_letters(self) -> str:
        """The dead-letter topic (``<input_topic>.dead-letter`` unless set)."""
        return self.dead_letter_topic or f"{self.input_topic}.dead-letter"

    def group_for(self, runtime: str, model: str) -> str:
        """The consumer group every version of ``model`` on ``runtime`` shares."""
        if self.consumer_group:
            return self.consumer_group.replace("{model}", model)
        return f"mlc.{runtime}.{model}"

    def client_config(self) -> dict[str, str]:
        """librdkafka settings for connecting (no secret: see :func:`with_secret`)."""
        config = {"bootstrap.servers": self.bootstrap_servers, "security.protocol": self.security_protocol}
        optional = {
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "ssl.ca.location": self.ssl_ca_location,
            "ssl.certificate.location": self.ssl_certificate_location,
            "ssl.key.location": self.ssl_key_location,
        }
        config.update({k: v for k, v in optional.items() if v is not None})
        return config
