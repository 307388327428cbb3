-- Which run is each runtime's reconciler: the first run of the continue-as-new chain a
-- trusted worker started under the reconciler's workflow id. The reconcile activities
-- serve only that chain, so a workflow someone else started under the same type and id
-- gets nothing (see activities/reconcile.py).

CREATE TABLE reconcilers (
    workflow_id   text PRIMARY KEY,
    runtime       text NOT NULL,
    first_run_id  text NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now()
);

GRANT SELECT, INSERT, UPDATE ON reconcilers TO mlc_worker;
