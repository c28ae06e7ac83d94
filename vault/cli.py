"""`python -m vault serve|migrate|worker|init-kms|rotate-keys|rewrap|audit-verify`.

Also reachable as `tessera vault ...` (and `tessera serve vault`, `tessera migrate vault`). The
key and audit commands run the same code as the admin endpoints, in-process, as the vault's
runtime role, and each is itself audited.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

import asyncpg

from core.errors import TesseraError
from core.ids import new_id
from tessera.runtime.commands import load_or_exit, migrate_service, serve_service

DEFAULT_MIGRATION_URL = "postgresql://tessera_vault_owner@127.0.0.1:5432/tessera_vault"


def init_kms() -> None:
    """Create the local (development) KMS keyring if it does not exist yet."""
    from vault.kms.local import LocalKms, default_keyring_path

    path = os.environ.get("TESSERA_VAULT_LOCAL_KMS_PATH") or str(default_keyring_path())
    if os.path.exists(path):
        print(f"local KMS keyring: {path} (kept)")
        return
    LocalKms.create_keyring(path)
    print(f"local KMS keyring: {path} (created)")


async def _admin_task(command: str) -> dict[str, Any]:
    from vault.app import open_kms
    from vault.audit import AuditLog
    from vault.keys import KeyRepository, KeyService
    from vault.settings import VaultSettings

    settings = load_or_exit(VaultSettings, "vault")
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    kms = await open_kms(settings)
    try:
        keys = KeyService(kms, KeyRepository(pool))
        audit = AuditLog(pool, await keys.audit_key())
        request_id = new_id("req")
        if command == "audit-verify":
            report = await audit.verify()
            await audit.append(
                actor="admin:cli",
                action="audit.verify",
                outcome="ok" if report.ok else "broken",
                request_id=request_id,
            )
            return dict(report.to_dict())
        action = {"rotate-keys": "keys.rotate", "rewrap": "keys.rewrap"}[command]
        await audit.append(
            actor="admin:cli", action=action, outcome="requested", request_id=request_id
        )
        return dict(await (keys.rotate() if command == "rotate-keys" else keys.rewrap()))
    finally:
        await kms.close()
        await pool.close()


def _worker(once: list[str]) -> None:
    from tessera.runtime.logging import configure_logging
    from vault import worker
    from vault.settings import VaultWorkerSettings

    settings = load_or_exit(VaultWorkerSettings, "vault worker")
    # With --once, stdout is the results (JSON) and the log goes to stderr.
    configure_logging("vault-worker", settings.log_level, stream=sys.stderr if once else None)
    if once:
        results = asyncio.run(worker.run_once(settings, once))
        print(json.dumps(results, indent=2, default=str))
        if any(result is None for result in results.values()):
            raise SystemExit(1)
    else:
        worker.main(settings)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tessera vault", description="The tokenization vault.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="serve HTTP (settings from TESSERA_VAULT_* variables)")
    commands.add_parser("migrate", help="apply migrations as the owner role")
    worker = commands.add_parser("worker", help="the periodic jobs (retention); several may run")
    worker.add_argument(
        "--once", default="", help="comma-separated jobs to run now, once, then exit"
    )
    commands.add_parser("init-kms", help="create the local development KMS keyring")
    commands.add_parser("rotate-keys", help="make a new KEK version primary")
    commands.add_parser("rewrap", help="re-wrap every data key under the primary KEK version")
    commands.add_parser("audit-verify", help="walk the audit chains; exit 1 if one is broken")
    args = parser.parse_args(argv)
    if args.command == "serve":
        from vault.app import create_app
        from vault.settings import VaultSettings

        serve_service(VaultSettings, create_app, "vault", factory="vault.app:app_from_environment")
    elif args.command == "migrate":
        migrate_service("vault", "vault.migrations", DEFAULT_MIGRATION_URL)
    elif args.command == "worker":
        _worker([name for name in args.once.split(",") if name])
    elif args.command == "init-kms":
        init_kms()
    else:
        try:
            result = asyncio.run(_admin_task(args.command))
        except TesseraError as exc:
            print(f"tessera vault {args.command}: {exc.message}", file=sys.stderr)
            raise SystemExit(1) from None
        print(json.dumps(result, indent=2, default=str))
        if args.command == "audit-verify" and not result.get("ok", False):
            raise SystemExit(1)
