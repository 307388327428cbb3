-- A notification is stored once per activity, however often Temporal retries it: the
-- activity's (workflow id, run id, activity id) is its idempotency key. Older rows have none.
ALTER TABLE notifications ADD COLUMN idempotency_key text;
CREATE UNIQUE INDEX notifications_idempotency_key ON notifications (idempotency_key);
