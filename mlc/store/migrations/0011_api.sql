-- mlc server: request nonces seen within their signature's lifetime (replay refusal, RFC 9421).
-- The workers never read or write them: no grant to mlc_worker.
CREATE TABLE api_nonces (
    keyid text NOT NULL,
    nonce text NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (keyid, nonce)
);
CREATE INDEX api_nonces_expires ON api_nonces (expires_at);
