-- The vault knows merchants only by id, a hash of their publishable key and the origins
-- their checkout pages are served from. Nothing else about them lives here.
GRANT SELECT ON schema_migrations TO tessera_vault;

CREATE TABLE merchants (
    id                      text PRIMARY KEY CHECK (id ~ '^mer_[0-9A-Za-z]{16,40}$'),
    publishable_key_sha256  bytea NOT NULL UNIQUE CHECK (octet_length(publishable_key_sha256) = 32),
    allowed_origins         text[] NOT NULL DEFAULT '{}',
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now()
);

GRANT SELECT, INSERT, UPDATE ON merchants TO tessera_vault;
