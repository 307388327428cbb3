"""Streaming deployments: a model scoring records from a Kafka topic into another.

:mod:`mlc.streaming.settings` (a runtime's ``kafka`` block and the consumer's own
configuration) and :mod:`mlc.streaming.consumer` (the long-running consumer) run inside
model containers too, so they import only pydantic, orjson, confluent-kafka and the model
server's loader; the topic administration, the stage-test probe and the lag report
(:mod:`mlc.streaming.topics`, :mod:`mlc.streaming.probe`) run on workers and in the CLI.
"""

from __future__ import annotations

from mlc.streaming.settings import KafkaSettings, StreamConfig

__all__ = ["KafkaSettings", "StreamConfig"]
