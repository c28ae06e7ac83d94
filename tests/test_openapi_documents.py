"""Both services' OpenAPI documents say what Schemathesis (tests/test_fuzz_schemathesis.py,
`make fuzz`) needs to hold the services to them: every credential, every shared error status,
bodies as msgspec decodes them, links that lead somewhere. Built in-process (no I/O)."""

from __future__ import annotations

from typing import Any

import pytest
from litestar import Litestar
from litestar._openapi.plugin import OpenAPIPlugin

from api.app import create_app as create_api
from api.settings import ApiSettings
from tessera.runtime.settings import load_settings
from vault.app import create_app as create_vault
from vault.settings import VaultSettings

SECRET = "document-only-" + "x" * 32  # pragma: allowlist secret
OPEN = {"healthz", "readyz", "notifyPspB"}  # no credential: probes, and a signed notification


def served(app: Litestar) -> dict[str, Any]:
    document: dict[str, Any] = app.plugins.get(OpenAPIPlugin).provide_openapi_schema()
    return document


DOCUMENTS = {
    "api": served(
        create_api(load_settings(ApiSettings, {"TESSERA_API_VAULT_SERVICE_TOKEN": SECRET}))
    ),
    "vault": served(
        create_vault(
            load_settings(
                VaultSettings,
                {"TESSERA_VAULT_SERVICE_TOKEN": SECRET, "TESSERA_VAULT_ADMIN_TOKEN": SECRET + "!"},
            )
        )
    ),
}


def operations(service: str) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, operation)
        for path, methods in DOCUMENTS[service]["paths"].items()
        for method, operation in methods.items()
    ]


def operation_named(service: str, operation_id: str) -> dict[str, Any]:
    return next(op for _m, _p, op in operations(service) if op["operationId"] == operation_id)


def body_of(service: str, operation: dict[str, Any]) -> dict[str, Any]:
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    return resolve(DOCUMENTS[service], schema)


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    name = schema["$ref"].rsplit("/", 1)[-1]
    component: dict[str, Any] = document["components"]["schemas"][name]
    return component


@pytest.mark.parametrize("service", sorted(DOCUMENTS))
def test_every_operation_names_a_credential_the_document_defines(service: str) -> None:
    schemes = DOCUMENTS[service]["components"]["securitySchemes"]
    for _method, _path, operation in operations(service):
        security = operation.get("security")
        if operation["operationId"] in OPEN:
            assert security is None, operation["operationId"]
            continue
        assert security, f"{operation['operationId']} names no credential"
        assert all(name in schemes for requirement in security for name in requirement)
        assert "401" in operation["responses"]
    if service == "vault":  # three credentials: a valid one of the wrong kind is a 403
        assert all(
            "403" in op["responses"] for _m, _p, op in operations(service) if op.get("security")
        )


@pytest.mark.parametrize("service", sorted(DOCUMENTS))
def test_every_error_status_is_the_error_object_and_the_shared_ones_are_there(service: str) -> None:
    document = DOCUMENTS[service]
    for _method, path, operation in operations(service):
        responses = operation["responses"]
        name = operation["operationId"]
        assert "400" in responses, name  # any request: a malformed Host header, at least
        if name != "healthz":
            assert "503" in responses, name  # database or Redis down
        if "{" in path:
            assert "404" in responses, name
        if "requestBody" in operation:
            assert {"400", "413"} <= set(responses), name
        for status, response in responses.items():
            if int(status) < 400 or name == "readyz":
                continue
            schema = response["content"]["application/json"]["schema"]
            assert resolve(document, schema)["title"] == "ErrorEnvelope", (name, status)
            others = set(response["content"]) - {"application/json"}
            assert others == ({"text/plain"} if status == "400" else set()), (name, status)


@pytest.mark.parametrize("service", sorted(DOCUMENTS))
def test_request_bodies_are_described_as_msgspec_decodes_them(service: str) -> None:
    bodies = [op for _m, _p, op in operations(service) if "requestBody" in op]
    assert bodies
    for operation in bodies:
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        assert set(schema) == {"$ref"}, operation["operationId"]  # no `oneOf` with null
        if operation["operationId"] != "notifyPspB":  # PSP B's own format, any fields
            assert body_of(service, operation)["additionalProperties"] is False


def test_limits_the_api_checks_itself_are_told_to_the_document() -> None:
    create = body_of("api", operation_named("api", "createPayment"))["properties"]
    assert create["amount"] == {"type": "integer", "minimum": 1, "maximum": 99_999_999}
    assert "EUR" in create["currency"]["enum"]
    assert create["metadata"]["maxProperties"] == 20


def test_optional_bodies_and_parameters_are_left_out_never_null() -> None:
    for service in DOCUMENTS:
        for _method, _path, operation in operations(service):
            for parameter in operation.get("parameters", []):
                assert "null" not in str(parameter["schema"]), (operation["operationId"], parameter)
    capture = operation_named("api", "capturePayment")
    assert capture["requestBody"]["required"] is False
    key = next(p for p in capture["parameters"] if p["name"] == "Idempotency-Key")
    assert key["required"] is True


@pytest.mark.parametrize("service", sorted(DOCUMENTS))
def test_every_link_leads_to_an_operation_and_fills_its_path(service: str) -> None:
    by_id = {op["operationId"]: (path, op) for _m, path, op in operations(service)}
    links = [
        (operation["operationId"], link)
        for _m, _p, operation in operations(service)
        for response in operation["responses"].values()
        for link in response.get("links", {}).values()
    ]
    assert len(links) >= (20 if service == "api" else 3)
    for source, link in links:
        path, _target = by_id[link["operationId"]]
        filled = {f"{{{name}}}" for name in link["parameters"]}
        assert {part for part in path.split("/") if part.startswith("{")} == filled, (source, link)
    targets = {link["operationId"] for _source, link in links}
    expected = {"capturePayment", "cancelPayment", "refundPayment", "getPayment", "getRefund"}
    assert (expected if service == "api" else {"readToken", "deleteToken"}) <= targets
