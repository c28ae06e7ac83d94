-- Merchants and their secret API keys. Keys are stored only as SHA-256 hashes: they carry
-- 190+ random bits, so a fast hash is safe, and a lookup by hash never compares secrets.
GRANT SELECT ON schema_migrations TO tessera_api;

CREATE TABLE merchants (
    id          text PRIMARY KEY CHECK (id ~ '^mer_[0-9A-Za-z]{16,40}$'),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE merchant_api_keys (
    merchant_id  text NOT NULL REFERENCES merchants (id),
    key_sha256   bytea NOT NULL CHECK (octet_length(key_sha256) = 32),
    kind         text NOT NULL CHECK (kind IN ('secret')),
    last4        text NOT NULL CHECK (length(last4) = 4),
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz,
    PRIMARY KEY (merchant_id, key_sha256)
);
CREATE UNIQUE INDEX merchant_api_keys_active ON merchant_api_keys (key_sha256)
    WHERE revoked_at IS NULL;

GRANT SELECT, INSERT ON merchants TO tessera_api;
GRANT SELECT, INSERT, UPDATE (revoked_at) ON merchant_api_keys TO tessera_api;
