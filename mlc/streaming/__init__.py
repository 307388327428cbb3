"""Streaming deployments: a model scoring records from a Kafka topic into another.

:mod:`mlc.streaming.settings` (the consumer's own configuration, around a runtime's
``kafka`` block from :mod:`mlc.kafka_settings`) and :mod:`mlc.streaming.consumer` (the
long-running consumer) run inside model containers too, so they import only pydantic,
orjson, confluent-kafka and the model server's loader; the topic administration, the
stage-test probe and the lag report (:mod:`mlc.streaming.topics`, :mod:`mlc.streaming.probe`)
run on workers and in the CLI.
"""

from __future__ import annotations

from mlc.kafka_settings import KafkaSettings
from mlc.streaming.settings import StreamConfig

__all__ = ["KafkaSettings", "StreamConfig"]
