-- Streaming: a runtime's kafka settings (brokers, topics, consumer group, security; no
-- secrets, see mlc.streaming.settings.KafkaSettings), like its docker settings.

ALTER TABLE runtimes ADD COLUMN kafka jsonb;
