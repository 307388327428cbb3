-- Stable endpoints: a runtime's gateway settings (like its docker and kafka settings), and
-- the traffic table: which deployments answer each model's stable endpoint on each runtime
-- with a gateway, and with which share. History is in the audit trail (kind `traffic`).

ALTER TABLE runtimes ADD COLUMN gateway jsonb;

CREATE TABLE traffic (
    runtime      text NOT NULL,
    model        text NOT NULL,
    stage        text NOT NULL,
    routes       jsonb NOT NULL DEFAULT '[]',
    endpoint     text NOT NULL,
    workflow_id  text,
    run_id       text,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (runtime, model)
);
CREATE INDEX traffic_stage ON traffic (stage, model);

-- Workers keep it current (on an authorized, applied change); nobody deletes history
-- because there is none here: the audit trail holds it.
GRANT SELECT, INSERT, UPDATE ON traffic TO mlc_worker;
