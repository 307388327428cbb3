-- Density: whether a runtime's online deployments share one model-host process
-- (`shared`, `dedicated`, or NULL for the default; see mlc.domain.Runtime.hosting).

ALTER TABLE runtimes ADD COLUMN hosting text;
