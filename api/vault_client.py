"""The API's only way to the vault: HTTP to the vault's published endpoints."""

from __future__ import annotations

import httpx

from core.errors import ServiceUnavailable, TesseraError


class VaultAdminClient:
    """Admin calls made by operators' commands (merchant registration), never by requests."""

    def __init__(self, base_url: str, admin_token: str, timeout: float = 10.0) -> None:
        self._http = httpx.Client(
            base_url=base_url,
            headers={"authorization": f"Bearer {admin_token}"},
            timeout=timeout,
        )

    def register_merchant(
        self, merchant_id: str, publishable_key: str, allowed_origins: list[str]
    ) -> list[str]:
        try:
            response = self._http.post(
                "/v1/merchants",
                json={
                    "id": merchant_id,
                    "publishable_key": publishable_key,
                    "allowed_origins": allowed_origins,
                },
            )
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(f"The vault did not answer ({type(exc).__name__}).") from None
        if response.status_code != 201:
            error = response.json().get("error", {}) if response.content else {}
            raise TesseraError(
                f"The vault refused the merchant: {error.get('message', response.status_code)}",
                code=error.get("code", "vault_error"),
                param=error.get("param"),
            )
        origins: list[str] = response.json()["allowed_origins"]
        return origins

    def close(self) -> None:
        self._http.close()
