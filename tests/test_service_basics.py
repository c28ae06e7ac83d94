"""Both services, as real processes on real sockets: health, readiness, request ids,
metrics and error bodies."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.support.processes import ServiceProcess

ERROR_KEYS = {"type", "code", "message", "request_id"}


@pytest.fixture(params=["api", "vault"])
def service(request: pytest.FixtureRequest) -> ServiceProcess:
    process: ServiceProcess = request.getfixturevalue(request.param)
    return process


def assert_error(response: httpx.Response, status: int, type_: str, code: str) -> dict[str, str]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error: dict[str, str] = response.json()["error"]
    assert error.keys() >= ERROR_KEYS
    assert (error["type"], error["code"]) == (type_, code)
    assert error["request_id"] == response.headers["request-id"]
    assert "Traceback" not in response.text
    return error


def test_healthz_answers_while_the_process_is_up(service: ServiceProcess) -> None:
    response = httpx.get(service.url + "/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_checks_the_database_and_redis(service: ServiceProcess) -> None:
    response = httpx.get(service.url + "/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "checks": {"database": "ok", "redis": "ok"}}


def test_every_response_carries_a_generated_request_id(service: ServiceProcess) -> None:
    first = httpx.get(service.url + "/healthz").headers["request-id"]
    second = httpx.get(service.url + "/healthz").headers["request-id"]
    assert re.fullmatch(r"req_[0-9a-z]{20,40}", first)
    assert first != second


def test_an_incoming_request_id_is_honoured(service: ServiceProcess) -> None:
    response = httpx.get(service.url + "/healthz", headers={"Request-Id": "edge-7f3a:42"})
    assert response.headers["request-id"] == "edge-7f3a:42"


def test_an_unsafe_incoming_request_id_is_replaced(service: ServiceProcess) -> None:
    response = httpx.get(service.url + "/healthz", headers={"Request-Id": "x" * 300})
    assert response.headers["request-id"].startswith("req_")


def test_unknown_routes_answer_a_json_404(service: ServiceProcess) -> None:
    response = httpx.get(service.url + "/v1/nothing-here", headers={"Request-Id": "r-404"})
    error = assert_error(response, 404, "invalid_request_error", "unknown_route")
    assert error["request_id"] == "r-404"


def test_a_wrong_method_answers_a_json_405(service: ServiceProcess) -> None:
    response = httpx.delete(service.url + "/healthz")
    assert_error(response, 405, "invalid_request_error", "method_not_allowed")


def test_metrics_are_labelled_by_route_template_never_by_raw_path(
    service: ServiceProcess,
) -> None:
    httpx.get(service.url + "/healthz")
    httpx.get(service.url + "/v1/unknown/4242424242424242")
    text = httpx.get(service.url + "/metrics").text
    assert 'route="/healthz"' in text
    assert 'route="unmatched"' in text
    assert "4242424242424242" not in text
    assert "/v1/unknown" not in text
    assert "http_request_duration_seconds_bucket" in text


def test_the_openapi_schema_is_served(service: ServiceProcess) -> None:
    schema = httpx.get(service.url + "/schema/openapi.json").json()
    assert "/healthz" in schema["paths"]
    assert "/readyz" in schema["paths"]


# --- errors through a real endpoint: the vault's merchant registry (admin only) -----------


def admin(tokens: dict[str, str]) -> dict[str, str]:
    return {"authorization": f"Bearer {tokens['admin']}"}


def test_a_request_without_credentials_is_refused(vault: ServiceProcess) -> None:
    response = httpx.post(vault.url + "/v1/merchants", json={})
    assert_error(response, 401, "authentication_error", "invalid_credentials")


def test_the_service_credential_may_not_register_merchants(
    vault: ServiceProcess, tokens: dict[str, str]
) -> None:
    headers = {"authorization": f"Bearer {tokens['service']}"}
    response = httpx.post(vault.url + "/v1/merchants", json={}, headers=headers)
    assert_error(response, 403, "permission_error", "forbidden")


def test_malformed_json_is_a_400(vault: ServiceProcess, tokens: dict[str, str]) -> None:
    response = httpx.post(
        vault.url + "/v1/merchants",
        content=b'{"id": "mer_',
        headers={**admin(tokens), "content-type": "application/json"},
    )
    assert_error(response, 400, "invalid_request_error", "invalid_json")


def test_unknown_fields_are_refused_with_their_name(
    vault: ServiceProcess, tokens: dict[str, str]
) -> None:
    body = {
        "id": "mer_01m89x6mx8w8b3hsan3qvysbvk",
        "publishable_key": "pk_test_" + "a" * 48,
        "color": "red",
    }
    response = httpx.post(vault.url + "/v1/merchants", json=body, headers=admin(tokens))
    error = assert_error(response, 400, "invalid_request_error", "parameter_unknown")
    assert error["param"] == "color"


def test_wrong_types_name_the_parameter(vault: ServiceProcess, tokens: dict[str, str]) -> None:
    body = {"id": 12, "publishable_key": "pk_test_" + "a" * 48}
    response = httpx.post(vault.url + "/v1/merchants", json=body, headers=admin(tokens))
    error = assert_error(response, 400, "invalid_request_error", "parameter_invalid")
    assert error["param"] == "id"


def test_a_body_over_the_limit_is_a_413_and_writes_nothing(
    vault: ServiceProcess, tokens: dict[str, str]
) -> None:
    body = {
        "id": "mer_01m89x6mx8w8b3hsan3qvysbv0",
        "publishable_key": "pk_test_" + "b" * 48,
        "allowed_origins": ["https://a.example"] * 10,
        "padding": "x" * 9000,
    }
    response = httpx.post(vault.url + "/v1/merchants", json=body, headers=admin(tokens))
    assert_error(response, 413, "invalid_request_error", "body_too_large")


def test_registering_a_merchant_twice_is_a_conflict(
    vault: ServiceProcess, tokens: dict[str, str]
) -> None:
    body = {
        "id": "mer_01m89x6mx8w8b3hsan3qvysbv1",
        "publishable_key": "pk_test_" + "c" * 48,
        "allowed_origins": ["HTTPS://Shop.Example:8443/", "https://shop.example:8443"],
    }
    first = httpx.post(vault.url + "/v1/merchants", json=body, headers=admin(tokens))
    assert first.status_code == 201, first.text
    assert first.json()["allowed_origins"] == ["https://shop.example:8443"]
    again = httpx.post(vault.url + "/v1/merchants", json=body, headers=admin(tokens))
    assert_error(again, 409, "invalid_request_error", "merchant_exists")


def test_error_bodies_and_logs_never_echo_a_card_number(
    vault: ServiceProcess, tokens: dict[str, str]
) -> None:
    pan = "4242424242424242"
    body = {"id": pan, "publishable_key": pan}
    response = httpx.post(vault.url + "/v1/merchants", json=body, headers=admin(tokens))
    assert response.status_code == 400
    assert pan not in response.text
    httpx.get(vault.url + f"/v1/tokens/{pan}")
    assert pan not in vault.output()
    for line in vault.output().splitlines():
        json.loads(line)  # every log line is one JSON object
