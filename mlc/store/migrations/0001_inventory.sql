-- The inventory: what exists, what runs where, and the audit trail of every decision.

CREATE TABLE models (
    name        text PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE snapshots (
    model         text NOT NULL REFERENCES models(name),
    version       integer NOT NULL CHECK (version >= 1),
    sha256        text NOT NULL,
    service_tags  text[] NOT NULL,
    entry_module  text NOT NULL,
    requirements  text[] NOT NULL DEFAULT '{}',
    manifest      jsonb NOT NULL,
    registered_by text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, version),
    UNIQUE (model, sha256)
);

CREATE TABLE runtimes (
    name          text PRIMARY KEY,
    kind          text NOT NULL,
    stage         text NOT NULL,
    service_tags  text[] NOT NULL,
    modes         text[] NOT NULL,
    task_queue    text NOT NULL,
    docker        jsonb,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX runtimes_stage ON runtimes (stage);

CREATE TABLE lifecycle_runs (
    workflow_id   text NOT NULL,
    run_id        text NOT NULL,
    model         text NOT NULL,
    version       integer NOT NULL,
    lifecycle     text NOT NULL,
    state         text NOT NULL,
    stage         text,
    reason        text,
    started_at    timestamptz NOT NULL DEFAULT now(),
    ended_at      timestamptz,
    PRIMARY KEY (workflow_id, run_id),
    FOREIGN KEY (model, version) REFERENCES snapshots(model, version)
);
-- One snapshot cannot run two lifecycles at once, whatever workflow id a user typed.
CREATE UNIQUE INDEX lifecycle_runs_one_active
    ON lifecycle_runs (model, version) WHERE ended_at IS NULL;

CREATE TABLE deployments (
    id            text PRIMARY KEY,
    model         text NOT NULL,
    version       integer NOT NULL,
    runtime       text NOT NULL,
    stage         text NOT NULL,
    mode          text NOT NULL,
    state         text NOT NULL,
    endpoint      text,
    workflow_id   text,
    details       jsonb NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (model, version) REFERENCES snapshots(model, version)
);
CREATE INDEX deployments_live ON deployments (stage, model) WHERE state IN ('deploying', 'serving');

CREATE TABLE test_results (
    id            bigserial PRIMARY KEY,
    workflow_id   text NOT NULL,
    run_id        text NOT NULL,
    model         text NOT NULL,
    version       integer NOT NULL,
    stage         text NOT NULL,
    deployment_id text NOT NULL,
    test          text NOT NULL,
    passed        boolean NOT NULL,
    summary       text NOT NULL,
    metrics       jsonb NOT NULL DEFAULT '{}',
    recorded_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE approvals (
    id            bigserial PRIMARY KEY,
    workflow_id   text NOT NULL,
    run_id        text NOT NULL,
    model         text NOT NULL,
    version       integer NOT NULL,
    stage         text NOT NULL,
    decision      text NOT NULL,
    approver      text NOT NULL,
    comment       text NOT NULL DEFAULT '',
    evidence      jsonb,
    decided_at    timestamptz NOT NULL
);

CREATE TABLE principals (
    name          text PRIMARY KEY,
    roles         text[] NOT NULL DEFAULT '{}'
);

CREATE TABLE notifications (
    id            bigserial PRIMARY KEY,
    workflow_id   text NOT NULL,
    model         text,
    version       integer,
    message       text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE lifecycle_definitions (
    name          text NOT NULL,
    version       integer NOT NULL CHECK (version >= 1),
    sha256        text NOT NULL,
    source        text NOT NULL,
    uploaded_by   text NOT NULL,
    uploaded_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version),
    UNIQUE (name, sha256)
);
