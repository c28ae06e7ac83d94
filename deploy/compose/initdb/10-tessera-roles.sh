#!/usr/bin/env bash
# The four roles and two databases of Tessera, made the way tessera/dbsetup.py makes them for
# the local stack and the tests (kept in step by tests/test_compose.py):
#   tessera_<service>_owner  owns the service's database and schema, runs its migrations
#   tessera_<service>        the runtime role the service logs in as; gets CONNECT and USAGE
#                            here, and table grants from the service's own migrations
#   tessera_auditor          the assessor's kit (`tessera pci evidence`): pg_read_all_data and
#                            CONNECT on both databases, nothing else
# PUBLIC loses CONNECT on both databases, so no role of one service can reach the other's.
#
# The postgres image runs this once, on the first start of an empty data volume, as the
# superuser over the local socket. Unlike dbsetup.py (trust auth on loopback), compose's
# Postgres checks passwords: each role gets the one compose passes in (dev defaults in
# deploy/compose.yaml). After changing a password, reset the volume: `docker compose down -v`.
set -euo pipefail

psql --no-psqlrc -v ON_ERROR_STOP=1 \
    --username "${POSTGRES_USER:-postgres}" --dbname postgres \
    -v api_password="${TESSERA_PG_API_PASSWORD:?}" \
    -v api_owner_password="${TESSERA_PG_API_OWNER_PASSWORD:?}" \
    -v vault_password="${TESSERA_PG_VAULT_PASSWORD:?}" \
    -v vault_owner_password="${TESSERA_PG_VAULT_OWNER_PASSWORD:?}" \
    -v auditor_password="${TESSERA_PG_AUDITOR_PASSWORD:?}" <<'SQL'
-- Roles are cluster-wide. `\gexec` runs the statement each query returns (none when the role
-- already exists): psql variables are not expanded inside DO blocks.
SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD %L', role, password)
FROM (VALUES
    ('tessera_api_owner', :'api_owner_password'),
    ('tessera_api', :'api_password'),
    ('tessera_vault_owner', :'vault_owner_password'),
    ('tessera_vault', :'vault_password'),
    ('tessera_auditor', :'auditor_password')
) AS wanted (role, password)
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = wanted.role)
\gexec

CREATE DATABASE "tessera_api" OWNER "tessera_api_owner" TEMPLATE template0 ENCODING 'UTF8';
REVOKE ALL ON DATABASE "tessera_api" FROM PUBLIC;
GRANT CONNECT ON DATABASE "tessera_api" TO "tessera_api";

CREATE DATABASE "tessera_vault" OWNER "tessera_vault_owner" TEMPLATE template0 ENCODING 'UTF8';
REVOKE ALL ON DATABASE "tessera_vault" FROM PUBLIC;
GRANT CONNECT ON DATABASE "tessera_vault" TO "tessera_vault";

GRANT pg_read_all_data TO "tessera_auditor";
GRANT CONNECT ON DATABASE "tessera_api" TO "tessera_auditor";
GRANT CONNECT ON DATABASE "tessera_vault" TO "tessera_auditor";

\connect tessera_api
REVOKE ALL ON SCHEMA public FROM PUBLIC;
ALTER SCHEMA public OWNER TO "tessera_api_owner";
GRANT USAGE ON SCHEMA public TO "tessera_api";

\connect tessera_vault
REVOKE ALL ON SCHEMA public FROM PUBLIC;
ALTER SCHEMA public OWNER TO "tessera_vault_owner";
GRANT USAGE ON SCHEMA public TO "tessera_vault";
SQL
