-- Nothing in the vault changes a registered merchant: the runtime role keeps only SELECT and
-- INSERT on the registry (0001 granted UPDATE too).
REVOKE UPDATE ON merchants FROM tessera_vault;
