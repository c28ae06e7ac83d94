"""`python -m api serve|migrate|merchants ...` (also reachable as `tessera ...`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import sys
from typing import Any

import asyncpg
import msgspec

from api.services.ledger import LedgerReport, LedgerService
from api.services.routing import Fee, ProcessorFees, RoutingConfig, Rule
from api.settings import ApiSettings, OperatorSettings
from api.storage.merchants import MerchantRepository
from api.storage.routing import RoutingRepository
from api.vault_client import VaultAdminClient
from core.errors import TesseraError
from core.ids import new_id
from tessera.runtime.commands import load_or_exit, migrate_service, serve_service
from tessera.runtime.db import create_pool
from tessera.runtime.settings import BaseSettings

KNOWN_PROCESSORS = frozenset({"psp_a", "psp_b"})
DEFAULT_MIGRATION_URL = "postgresql://tessera_api_owner@127.0.0.1:5432/tessera_api"


def _new_key(kind: str, settings: BaseSettings) -> str:
    return f"{kind}_{'live' if settings.production else 'test'}_{secrets.token_hex(24)}"


async def _with_repository(
    settings: OperatorSettings,
) -> tuple[asyncpg.Connection, MerchantRepository]:
    conn = await asyncpg.connect(settings.database_url, timeout=settings.db_timeout_seconds)
    return conn, MerchantRepository(conn)


def create_merchant(name: str, origins: list[str]) -> dict[str, str]:
    """Register the merchant at the vault, then in the API; print the keys once.

    The registration goes to the vault's admin listener, `TESSERA_VAULT_ADMIN_URL` (where the
    vault keeps its listeners on separate ports), else to `TESSERA_API_VAULT_URL`."""
    settings = load_or_exit(OperatorSettings, "merchants")
    if not settings.vault_admin_token:
        raise TesseraError(
            "Set TESSERA_VAULT_ADMIN_TOKEN (or TESSERA_VAULT_ADMIN_TOKEN_FILE): registering a "
            "merchant at the vault is an administrator's act.",
            code="vault_admin_token_missing",
        )
    merchant_id = new_id("mer")
    secret_key = _new_key("sk", settings)
    publishable_key = _new_key("pk", settings)
    vault = VaultAdminClient(
        settings.vault_admin_url or settings.vault_url, settings.vault_admin_token
    )
    try:
        vault.register_merchant(merchant_id, publishable_key, origins)
    finally:
        vault.close()

    async def store() -> None:
        conn, merchants = await _with_repository(settings)
        try:
            await merchants.create(merchant_id, name, secret_key)
        finally:
            await conn.close()

    asyncio.run(store())
    return {
        "merchant_id": merchant_id,
        "secret_key": secret_key,
        "publishable_key": publishable_key,
    }


def roll_secret_key(merchant_id: str) -> dict[str, str]:
    settings = load_or_exit(OperatorSettings, "merchants")
    new_key = _new_key("sk", settings)

    async def roll() -> bool:
        conn, merchants = await _with_repository(settings)
        try:
            return await merchants.roll_secret_key(merchant_id, new_key)
        finally:
            await conn.close()

    if not asyncio.run(roll()):
        raise TesseraError(f"No merchant {merchant_id}.", code="resource_missing")
    return {"merchant_id": merchant_id, "secret_key": new_key}


def configure_routing(args: argparse.Namespace) -> dict[str, Any]:
    """Change a merchant's routing; options not given keep their current value."""
    settings = load_or_exit(OperatorSettings, "merchants")

    async def apply() -> RoutingConfig:
        conn = await asyncpg.connect(settings.database_url, timeout=settings.db_timeout_seconds)
        try:
            exists = await conn.fetchval("SELECT 1 FROM merchants WHERE id = $1", args.merchant)
            if not exists:
                raise TesseraError(f"No merchant {args.merchant}.", code="resource_missing")
            routing = RoutingRepository(conn, ttl_seconds=0.001)
            current = await routing.config(args.merchant)
            updated = edit_routing(current, args)
            await routing.save(args.merchant, updated)
            return updated
        finally:
            await conn.close()

    config = asyncio.run(apply())
    result: dict[str, Any] = msgspec.to_builtins(config)
    return {"merchant_id": args.merchant, **result}


def check_ledger() -> LedgerReport:
    """`tessera ledger check`: read-only, in one repeatable-read snapshot."""
    settings = load_or_exit(OperatorSettings, "ledger")

    async def run() -> LedgerReport:
        pool = await create_pool(
            settings.database_url, min_size=1, max_size=1, wait_seconds=settings.db_timeout_seconds
        )
        try:
            return await LedgerService(pool).check()
        finally:
            await pool.close()

    return asyncio.run(run())


def _api_url(settings: ApiSettings) -> str:
    return os.environ.get("TESSERA_API_URL", f"http://{settings.host}:{settings.port}")


def configure_routing_for(
    merchant_id: str, processors: tuple[str, ...], fees: dict[str, Fee]
) -> None:
    """Set a merchant's processors and default fees (the simulation's strategies)."""
    settings = load_or_exit(ApiSettings, "api")

    async def apply() -> None:
        conn = await asyncpg.connect(settings.database_url, timeout=settings.db_timeout_seconds)
        try:
            config = RoutingConfig(processors, (), {n: ProcessorFees(f) for n, f in fees.items()})
            await RoutingRepository(conn, ttl_seconds=0.001).save(merchant_id, config)
        finally:
            await conn.close()

    asyncio.run(apply())


def edit_routing(config: RoutingConfig, args: argparse.Namespace) -> RoutingConfig:
    processors = config.processors
    if args.processors:
        processors = tuple(p.strip() for p in args.processors.split(",") if p.strip())
    unknown = set(processors) - KNOWN_PROCESSORS
    if unknown:
        raise TesseraError(f"Unknown processors: {sorted(unknown)}.", code="processor_unknown")
    fees = {name: fees for name, fees in config.fees.items()}
    for entry in args.fee:
        match = re.fullmatch(r"([a-z_0-9]+)(?::([a-z]+))?=(\d+)\+(\d+)", entry)
        if not match:
            raise TesseraError(f"--fee {entry!r}: use PSP[:BRAND]=FIXED+BP", code="fee_invalid")
        name, brand, fixed, bp = match[1], match[2], int(match[3]), int(match[4])
        current = fees.get(name, ProcessorFees())
        if brand:
            fees[name] = ProcessorFees(current.default, {**current.brands, brand: Fee(fixed, bp)})
        else:
            fees[name] = ProcessorFees(Fee(fixed, bp), current.brands)
    rules = list(config.rules)
    for entry in args.rule:
        name, _, conditions = entry.partition(":")
        fields: dict[str, Any] = {"processor": name}
        for condition in filter(None, conditions.split(",")):
            key, _, value = condition.partition("=")
            fields[key] = int(value) if key.endswith("amount") else value
        rules.append(msgspec.convert(fields, Rule))
    cascade = config.cascade_soft_declines
    if args.cascade_soft_declines is not None:
        cascade = args.cascade_soft_declines
    recovery = config.recovery if args.recovery is None else args.recovery
    return RoutingConfig(tuple(processors), tuple(rules), fees, cascade, recovery)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tessera api", description="The payment API.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="serve HTTP (settings from TESSERA_API_* variables)")
    commands.add_parser("migrate", help="apply migrations as the owner role")
    commands.add_parser("worker", help="reconciler, completer and expiry (safe to run several)")
    merchants = commands.add_parser("merchants", help="create merchants, roll their keys")
    actions = merchants.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a merchant in the API and the vault")
    create.add_argument("--name", required=True)
    create.add_argument("--origin", action="append", default=[], help="checkout page origin")
    create.add_argument("--json", action="store_true", help="print JSON only")
    roll = actions.add_parser("roll-key", help="replace a merchant's secret key")
    roll.add_argument("--merchant", required=True)
    roll.add_argument("--json", action="store_true", help="print JSON only")
    configure = actions.add_parser("configure", help="routing: processors, rules, fees")
    configure.add_argument("--merchant", required=True)
    configure.add_argument("--processors", help="comma-separated, e.g. psp_a,psp_b")
    configure.add_argument(
        "--cascade-soft-declines",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="retry soft declines (do_not_honor, ...) at the next processor",
    )
    configure.add_argument(
        "--recovery",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="retry declined renewals on a schedule (docs/subscriptions.md)",
    )
    configure.add_argument(
        "--fee",
        action="append",
        default=[],
        metavar="PSP[:BRAND]=FIXED+BP",
        help="fee schedule entry, e.g. psp_a=10+140 or psp_b:amex=20+250 (minor units, bp)",
    )
    configure.add_argument(
        "--rule",
        action="append",
        default=[],
        metavar="PSP:KEY=VALUE[,KEY=VALUE]",
        help="eligibility rule, e.g. psp_b:currency=EUR,brand=visa,max_amount=50000",
    )
    configure.add_argument("--json", action="store_true", help="print JSON only")
    routing = commands.add_parser("routing", help="routing tools")
    routing_actions = routing.add_subparsers(dest="routing_action", required=True)
    simulate = routing_actions.add_parser(
        "simulate", help="the router against always-A and always-B on the running stack"
    )
    simulate.add_argument("--traffic", required=True, help="a traffic file (JSON)")
    recovery = commands.add_parser("recovery", help="recovering declined renewals")
    recovery_actions = recovery.add_subparsers(dest="recovery_action", required=True)
    replay = recovery_actions.add_parser(
        "simulate", help="the learned retry schedule against a fixed one (offline, seeded)"
    )
    replay.add_argument("--seed", type=int, default=1)
    replay.add_argument("--customers", type=int, default=100_000)
    ledger = commands.add_parser("ledger", help="the double-entry ledger")
    ledger_actions = ledger.add_subparsers(dest="ledger_action", required=True)
    ledger_actions.add_parser(
        "check", help="prove the ledger balances and matches the payments table (exit 1 if not)"
    )
    args = parser.parse_args(argv)

    if args.command == "serve":
        from api.app import create_app

        serve_service(ApiSettings, create_app, "api", factory="api.app:app_from_environment")
        return
    if args.command == "worker":
        from api.worker import main as worker_main
        from tessera.runtime.logging import configure_logging

        settings = load_or_exit(ApiSettings, "api")
        configure_logging("worker", settings.log_level)
        worker_main(settings)
        return
    if args.command == "routing":
        from api import simulate as simulation

        settings = load_or_exit(ApiSettings, "api")
        simulators = {"psp_a": settings.psp_a_url, "psp_b": settings.psp_b_url}
        results = simulation.run(args.traffic, _api_url(settings), settings.vault_url, simulators)
        print(simulation.report(results))
        return
    if args.command == "recovery":
        from api import recovery_simulate

        print(recovery_simulate.render(recovery_simulate.simulate(args.seed, args.customers)))
        return
    if args.command == "migrate":
        migrate_service("api", "api.migrations", DEFAULT_MIGRATION_URL)
        return
    if args.command == "ledger":
        report = check_ledger()
        print(msgspec.json.format(msgspec.json.encode(report)).decode())
        raise SystemExit(0 if report.ok else 1)
    try:
        if args.action == "create":
            result = create_merchant(args.name, args.origin)
        elif args.action == "configure":
            result = configure_routing(args)
        else:
            result = roll_secret_key(args.merchant)
    except TesseraError as exc:
        print(f"tessera merchants: {exc.message}", file=sys.stderr)
        raise SystemExit(1) from None
    except (asyncpg.PostgresError, OSError) as exc:
        print(f"tessera merchants: database error: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
        print("The secret key is shown only now; store it in your secret manager.")
