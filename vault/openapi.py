"""What the vault adds to its OpenAPI document: its three credentials (`vault.auth`), and the
links from a new token to the operations that take its id."""

from __future__ import annotations

from litestar.openapi.spec import SecurityRequirement

from tessera.runtime.openapi import Link, ServiceDocument

PUBLISHABLE_KEY: list[SecurityRequirement] = [{"publishableKey": []}]
SERVICE_TOKEN: list[SecurityRequirement] = [{"serviceToken": []}]
ADMIN_TOKEN: list[SecurityRequirement] = [{"adminToken": []}]

_TOKEN = {"token_id": "$response.body#/id"}

DOCUMENT = ServiceDocument(
    security_schemes={
        "publishableKey": {
            "type": "http",
            "scheme": "bearer",
            "description": "A merchant's publishable key, `pk_...`: creates tokens only.",
        },
        "serviceToken": {
            "type": "http",
            "scheme": "bearer",
            "description": "The payment API's credential (or its mTLS identity behind a mesh); "
            "it names the merchant it acts for in `Tessera-Merchant`.",
        },
        "adminToken": {
            "type": "http",
            "scheme": "bearer",
            "description": "A vault administrator's credential.",
        },
    },
    # A valid credential of the wrong kind is 403; a missing or unknown one 401.
    guard_statuses=(401, 403),
    links={
        ("createToken", 201): {
            "ReadToken": Link("readToken", _TOKEN),
            "DeleteToken": Link("deleteToken", _TOKEN),
        },
        ("readToken", 200): {"DeleteToken": Link("deleteToken", _TOKEN)},
    },
)
