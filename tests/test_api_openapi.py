"""The OpenAPI document at /schema describes the payment API as it really answers."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.support.processes import ServiceProcess

EXPECTED = {
    ("post", "/v1/payments"): (
        "createPayment",
        {"201", "202", "400", "401", "402", "409", "413", "422", "502", "503"},
    ),
    ("post", "/v1/payments/{payment}/capture"): ("capturePayment", {"200", "404", "409", "502"}),
    ("post", "/v1/payments/{payment}/cancel"): ("cancelPayment", {"200", "404", "409"}),
    ("post", "/v1/payments/{payment}/refunds"): ("refundPayment", {"201", "404", "409", "502"}),
    ("get", "/v1/payments/{payment}"): ("getPayment", {"200", "401", "404"}),
    ("get", "/v1/payments"): ("listPayments", {"200", "400", "401"}),
    ("get", "/v1/refunds/{refund}"): ("getRefund", {"200", "401", "404"}),
}


@pytest.fixture(scope="module")
def schema(api: ServiceProcess) -> dict[str, Any]:
    document: dict[str, Any] = httpx.get(api.url + "/schema/openapi.json").json()
    return document


@pytest.mark.parametrize(("method", "path"), sorted(EXPECTED))
def test_every_operation_is_documented_with_the_statuses_it_returns(
    schema: dict[str, Any], method: str, path: str
) -> None:
    operation = schema["paths"][path][method]
    operation_id, statuses = EXPECTED[(method, path)]
    assert operation["operationId"] == operation_id
    assert statuses <= set(operation["responses"])


def test_the_payment_object_and_the_request_are_in_the_schema(schema: dict[str, Any]) -> None:
    components = schema["components"]["schemas"]
    payment = next(v for k, v in components.items() if k.endswith("PaymentView"))
    assert {"amount", "currency", "status", "amount_refunded", "card", "refunds"} <= set(
        payment["properties"]
    )
    create = next(v for k, v in components.items() if k.endswith("CreatePayment"))
    # `token`, or a stored credential's `payment_method` (checked by the service, one of them).
    assert set(create["required"]) == {"amount", "currency"}
    assert {"token", "payment_method", "off_session", "mit_reason", "setup_future_usage"} <= set(
        create["properties"]
    )
    assert any(k.endswith("ErrorEnvelope") for k in components)
