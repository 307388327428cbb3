-- What network a runtime's local model processes get: `none` (a namespace of their own)
-- or `outbound` (other hosts, never the worker's own); see mlc.domain.Runtime.model_network.

ALTER TABLE runtimes ADD COLUMN model_network text NOT NULL DEFAULT 'none';
