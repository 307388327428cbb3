"""The embedded stack behind ``mlc dev``, ``mlc demo`` and the tests: Temporal's dev server
(behind its mutual-TLS proxy), PostgreSQL and a Kafka-compatible broker, all from wheels."""
