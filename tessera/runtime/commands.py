"""`serve` and `migrate` as every service runs them (`python -m vault serve`, ...)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from tessera.runtime.logging import configure_logging, get_logger
from tessera.runtime.migrations import MigrationError, migrate
from tessera.runtime.serve import serve
from tessera.runtime.settings import BaseSettings, ServiceSettings, SettingsError, load_settings

S = TypeVar("S", bound=BaseSettings)
T = TypeVar("T", bound=ServiceSettings)


def load_or_exit(cls: type[S], service: str) -> S:
    try:
        return load_settings(cls)
    except SettingsError as exc:
        print(f"tessera {service}: invalid settings: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def serve_service(
    cls: type[T], create_app: Callable[[T], Any], service: str, factory: str | None = None
) -> None:
    """`factory` ("module:function") builds the app inside each process when the service's
    `WORKERS` setting asks for more than one."""
    settings = load_or_exit(cls, service)
    configure_logging(service, settings.log_level)
    ports = settings.listen_ports()
    get_logger("tessera").info(
        "starting", mode=settings.mode, ports=ports, workers=settings.workers
    )
    serve(
        None if settings.workers > 1 else create_app(settings),
        host=settings.host,
        port=settings.port,
        extra_ports=[port for port in ports if port != settings.port],
        shutdown_timeout=settings.shutdown_timeout_seconds,
        keep_alive=settings.keep_alive_seconds,
        log_level=settings.log_level,
        workers=settings.workers,
        factory=factory,
    )


def app_in_worker(cls: type[T], create_app: Callable[[T], Any], service: str) -> Any:
    """What a worker process of a multi-process service runs: settings and logging of its own."""
    settings = load_or_exit(cls, service)
    configure_logging(service, settings.log_level)
    return create_app(settings)


def migrate_service(service: str, package: str, default_dsn: str) -> None:
    """Apply `package`'s migrations as the database owner (`TESSERA_<SERVICE>_MIGRATION_URL`)."""
    variable = f"TESSERA_{service.upper()}_MIGRATION_URL"
    dsn = os.environ.get(variable, default_dsn)
    try:
        applied = asyncio.run(migrate(dsn, package))
    except MigrationError as exc:
        print(f"tessera migrate {service}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as exc:
        print(f"tessera migrate {service}: cannot reach the database ({exc})", file=sys.stderr)
        raise SystemExit(1) from None
    names = ", ".join(f"{m.version:04d}_{m.name}" for m in applied) or "nothing to apply"
    print(f"migrate {service}: {names}")
