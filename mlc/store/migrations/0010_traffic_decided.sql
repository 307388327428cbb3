-- When the change live behind a stable endpoint was decided (its route_traffic grant's
-- authorization time): changes of one endpoint recorded out of order (twenty runs of one
-- model approved together) keep the newest decision in the table. NULL for rows written
-- before: any recorded change is newer.

ALTER TABLE traffic ADD COLUMN decided_at timestamptz;
