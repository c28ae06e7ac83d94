"""The vault's app factory: the one place its plugins, pools and handlers are wired."""

from __future__ import annotations

from typing import Any

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide

from tessera.runtime.service import build_app
from vault.merchants import MerchantController, MerchantRepository
from vault.settings import MAX_BODY_BYTES, VaultSettings


def _merchants(state: State) -> MerchantRepository:
    return MerchantRepository(state.pool)


def create_app(settings: VaultSettings) -> Litestar:
    dependencies: dict[str, Any] = {"merchants": Provide(_merchants, sync_to_thread=False)}
    return build_app(
        service="vault",
        title="Tessera vault",
        settings=settings,
        migrations_package="vault.migrations",
        route_handlers=[MerchantController],
        dependencies=dependencies,
        max_body_bytes=MAX_BODY_BYTES,
    )
