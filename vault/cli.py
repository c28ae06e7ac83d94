"""`python -m vault serve|migrate` (also `tessera serve vault`, `tessera migrate vault`)."""

from __future__ import annotations

import argparse

from tessera.runtime.commands import migrate_service, serve_service

DEFAULT_MIGRATION_URL = "postgresql://tessera_vault_owner@127.0.0.1:5432/tessera_vault"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tessera vault", description="The tokenization vault.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="serve HTTP (settings from TESSERA_VAULT_* variables)")
    commands.add_parser("migrate", help="apply migrations as the owner role")
    args = parser.parse_args(argv)
    if args.command == "serve":
        from vault.app import create_app
        from vault.settings import VaultSettings

        serve_service(VaultSettings, create_app, "vault")
    elif args.command == "migrate":
        migrate_service("vault", "vault.migrations", DEFAULT_MIGRATION_URL)
