-- Reconciler: each runtime says what happens to a serving deployment found dead or
-- unhealthy (`no`, `on-failure[:N]`, `always`; see mlc.domain.Runtime.restart).

ALTER TABLE runtimes ADD COLUMN restart text NOT NULL DEFAULT 'on-failure:3';
