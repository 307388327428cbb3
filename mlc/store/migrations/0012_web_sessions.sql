-- Browser sessions of `mlc server`'s web page (docs/design/control-plane.md §3.3).
--
-- A signed `POST /v1/web-sessions` (`mlc login --web`) makes a row holding only the hash
-- of a single-use link token (valid 60 s). Following the link sets `token_hash` (the hash of
-- the `mlc_session` cookie: 32 random bytes), clears `link_hash` (used once) and starts
-- the session's 8 hours. Neither token is stored, so a read of this table opens no page.
-- Expired rows are deleted whenever a link is made. No grant to mlc_worker: only the
-- server reads or writes it.

CREATE TABLE web_sessions (
    id               bigserial PRIMARY KEY,
    principal        text NOT NULL,
    role             smallint NOT NULL,
    made_by          text NOT NULL,
    link_hash        text UNIQUE,
    link_expires_at  timestamptz NOT NULL,
    token_hash       text UNIQUE,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz,
    CHECK ((token_hash IS NULL) = (expires_at IS NULL))
);
CREATE INDEX web_sessions_expiry ON web_sessions (coalesce(expires_at, link_expires_at));

-- The page "waiting for me" lists runs at a gate, oldest first, without reading every run.
CREATE INDEX lifecycle_runs_waiting ON lifecycle_runs (started_at)
    WHERE state = 'awaiting_approval' AND ended_at IS NULL;
