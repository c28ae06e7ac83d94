"""What the payment API adds to its OpenAPI document: the secret-key scheme and the links
from an object's creation to the operations that take its id."""

from __future__ import annotations

from litestar.openapi.spec import SecurityRequirement

from tessera.runtime.openapi import Link, ServiceDocument

#: Every merchant operation's security requirement.
SECRET_KEY: list[SecurityRequirement] = [{"secretKey": []}]

_PAYMENT_ID = "$response.body#/id"
_FIRST_PAYMENT = "$response.body#/data/0/id"


def _payment_operations(payment: str) -> dict[str, Link]:
    return {
        name: Link(operation_id, {"payment": payment})
        for name, operation_id in (
            ("GetPayment", "getPayment"),
            ("CapturePayment", "capturePayment"),
            ("CancelPayment", "cancelPayment"),
            ("RefundPayment", "refundPayment"),
        )
    }


def _endpoint_operations() -> dict[str, Link]:
    endpoint = {"endpoint": "$response.body#/id"}
    return {
        "GetWebhookEndpoint": Link("getWebhookEndpoint", endpoint),
        "RollWebhookSecret": Link("rollWebhookSecret", endpoint),
        "DeleteWebhookEndpoint": Link("deleteWebhookEndpoint", endpoint),
    }


DOCUMENT = ServiceDocument(
    security_schemes={
        "secretKey": {
            "type": "http",
            "scheme": "bearer",
            "description": "The merchant's secret key, `Authorization: Bearer sk_...`.",
        }
    },
    links={
        ("createPayment", 201): _payment_operations(_PAYMENT_ID),
        ("createPayment", 202): _payment_operations(_PAYMENT_ID),
        ("capturePayment", 200): _payment_operations(_PAYMENT_ID),
        ("cancelPayment", 200): _payment_operations(_PAYMENT_ID),
        ("getPayment", 200): _payment_operations(_PAYMENT_ID),
        ("listPayments", 200): _payment_operations(_FIRST_PAYMENT),
        ("refundPayment", 201): {
            "GetRefund": Link("getRefund", {"refund": "$response.body#/id"}),
            **_payment_operations("$response.body#/payment"),
        },
        ("listEvents", 200): {
            "GetEvent": Link("getEvent", {"event": "$response.body#/data/0/id"}),
            "ListEventDeliveries": Link(
                "listEventDeliveries", {"event": "$response.body#/data/0/id"}
            ),
        },
        ("createWebhookEndpoint", 201): _endpoint_operations(),
        ("rollWebhookSecret", 200): _endpoint_operations(),
        ("listWebhookEndpoints", 200): {
            "GetWebhookEndpoint": Link(
                "getWebhookEndpoint", {"endpoint": "$response.body#/data/0/id"}
            ),
        },
    },
)
