-- The vault's audit trail (PCI DSS v4.0 req. 10): who did what to which token, when, and how it
-- ended. Append-only for the runtime role (it gets SELECT and INSERT, never UPDATE, DELETE or
-- TRUNCATE) and hash-chained, so an edit, a deletion or a reordering by anyone who can write the
-- table is found by `audit-verify`. The hash construction is documented in vault/audit.py.
--
-- Several independent chains, so concurrent appenders (many requests, several processes) do not
-- queue on one head row: an append claims a free head with FOR UPDATE SKIP LOCKED. Each chain
-- starts from a genesis hash of 32 zero bytes; chain_id and seq are inside every hash, so the
-- chains cannot be mixed up even though they share the genesis.

CREATE TABLE audit_chain_heads (
    chain_id   integer PRIMARY KEY CHECK (chain_id >= 0),
    last_seq   bigint NOT NULL CHECK (last_seq >= 0),
    last_hash  bytea NOT NULL CHECK (octet_length(last_hash) = 32)
) WITH (fillfactor = 50);  -- every append rewrites a head: leave room for HOT updates

INSERT INTO audit_chain_heads (chain_id, last_seq, last_hash)
SELECT g, 0, decode(repeat('00', 32), 'hex') FROM generate_series(0, 15) AS g;

CREATE TABLE audit_log (
    chain_id     integer NOT NULL,
    seq          bigint NOT NULL CHECK (seq >= 1),
    occurred_at  timestamptz NOT NULL,
    actor        text NOT NULL CHECK (length(actor) BETWEEN 1 AND 200),
    action       text NOT NULL
                 CHECK (length(action) <= 64 AND action ~ '^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$'),
    -- HMAC-SHA256 of the token id under the audit key: never the token id itself.
    token_hmac   bytea CHECK (octet_length(token_hmac) = 32),
    outcome      text NOT NULL CHECK (outcome ~ '^[a-z][a-z_]{0,31}$'),
    request_id   text CHECK (length(request_id) <= 200),
    detail       jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(detail) = 'object'),
    prev_hash    bytea NOT NULL CHECK (octet_length(prev_hash) = 32),
    hash         bytea NOT NULL CHECK (octet_length(hash) = 32),
    PRIMARY KEY (chain_id, seq)
);

-- Rows arrive in time order, so a BRIN index serves the export's "since" at almost no cost
-- per insert.
CREATE INDEX audit_log_occurred_at ON audit_log USING brin (occurred_at);

REVOKE ALL ON audit_log, audit_chain_heads FROM PUBLIC;
GRANT SELECT, INSERT ON audit_log TO tessera_vault;
-- SELECT ... FOR UPDATE needs UPDATE on some column; only the two that move are granted.
GRANT SELECT, UPDATE (last_seq, last_hash) ON audit_chain_heads TO tessera_vault;
