-- Trust: one append-only, hash-chained audit log replaces the mutable audit tables, and
-- workers get a role that can add to it but never change it.

CREATE TABLE audit_log (
    seq             bigint PRIMARY KEY CHECK (seq >= 1),
    kind            text NOT NULL,
    model           text,
    version         integer,
    workflow_id     text,
    run_id          text,
    body            text NOT NULL,   -- canonical JSON, hashed as stored (never re-rendered)
    envelope        text,            -- the DSSE envelope when a person signed it
    nonce           text UNIQUE,     -- a signed statement counts once
    idempotency_key text UNIQUE,     -- a retried activity appends once
    prev_hash       text NOT NULL,
    hash            text NOT NULL UNIQUE,
    recorded_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_snapshot ON audit_log (model, version, seq);
CREATE INDEX audit_log_run ON audit_log (workflow_id, run_id, kind);
CREATE INDEX audit_log_kind ON audit_log (kind, seq);

-- Defence in depth: even the owner cannot change or remove entries without first
-- dropping this trigger (and `mlc audit verify` catches whatever a superuser does).
CREATE FUNCTION audit_log_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP;
END $$;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_is_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_is_append_only();

DROP TABLE approvals;
DROP TABLE test_results;
DROP TABLE principals;

ALTER TABLE lifecycle_runs ADD COLUMN started_by text;

-- The workers' role: read the inventory, append to the trail, keep runs and deployments
-- current. No UPDATE, DELETE or TRUNCATE on the trail; no writes to snapshots, runtimes
-- or lifecycle code (those come from signed statements made with the CLI).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'mlc_worker') THEN
        CREATE ROLE mlc_worker NOLOGIN;
    END IF;
END $$;
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO mlc_worker;
GRANT SELECT ON models, snapshots, runtimes, lifecycle_definitions, schema_migrations TO mlc_worker;
GRANT SELECT, INSERT ON audit_log, notifications TO mlc_worker;
GRANT SELECT, INSERT, UPDATE ON lifecycle_runs, deployments TO mlc_worker;
GRANT USAGE ON SEQUENCE notifications_id_seq TO mlc_worker;
