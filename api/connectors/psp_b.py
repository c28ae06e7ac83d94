"""PSP B: an Adyen-like processor (the simulator in `sandbox/psp_b.py` speaks its protocol).

Wire format: `X-API-Key`, camelCase, amounts as `{"value", "currency"}`, our reference in
`merchantReference`, the outcome in a 200 body (`resultCode` `Authorised` / `Refused` with a
`refusalReason` / `Error`). Captures, cancels and refunds are only *received* at once and
confirmed later by an HMAC-signed notification (`api/routes/notifications.py`).
"""

from __future__ import annotations

from typing import Any

from api.connectors.base import (
    NOT_SENT,
    AuthorizeRequest,
    AuthorizeResult,
    OperationResult,
    Outcome,
    advice_code,
    processor_client,
    visa_category,
)
from api.vault_client import ForwardFailed, VaultClient
from tessera.runtime.http_client import HttpFailure, MaybeSent, NotSent

REFUSAL_REASONS = {
    "Not enough balance": "insufficient_funds",
    "Expired Card": "expired_card",
    "CVC Declined": "incorrect_cvc",
    "Do Not Honor": "do_not_honor",
    "Refused": "generic_decline",
    "Blocked Card": "pickup_card",
    "Revocation Of Auth": "revocation_of_authorization",
    "Issuer Unavailable": "issuer_unavailable",
    # The scheme's stored-credential rules (sandbox/README.md).
    "Authentication required": "authentication_required",
    "Transaction Not Permitted": "transaction_not_allowed",
}
#: The issuer's response code in `additionalData.refusalReasonRaw` ("41 : LOST CARD"), which says
#: more than the refusal reason ("Blocked Card" is lost, stolen or picked up).
RAW_RESPONSE_CODES = {
    "05": "do_not_honor",
    "51": "insufficient_funds",
    "54": "expired_card",
    "N7": "incorrect_cvc",
    "41": "lost_card",
    "43": "stolen_card",
    "46": "closed_account",
    "R0": "stop_recurring",
    "R1": "revocation_of_authorization",
    "91": "issuer_unavailable",
}
#: Our MIT reasons as PSP B's recurringProcessingModel (it has no model of its own for
#: installments: a fixed schedule agreed with the shopper, as a subscription is).
PROCESSING_MODELS = {
    "recurring": "Subscription",
    "installment": "Subscription",
    "unscheduled": "UnscheduledCardOnFile",
}


class PspBConnector:
    name = "psp_b"

    def __init__(
        self, vault: VaultClient, *, base_url: str, api_key: str, timeout_seconds: float
    ) -> None:
        self.vault = vault
        self._auth = {"X-API-Key": api_key}
        self._http = processor_client(base_url, self._auth, timeout_seconds)

    async def authorize(self, request: AuthorizeRequest) -> AuthorizeResult:
        method = {
            "number": "{{card.number}}",
            "expiryMonth": "{{card.exp_month}}",
            "expiryYear": "{{card.exp_year}}",
            "holderName": "{{card.name}}",
        }
        body: dict[str, Any] = {
            "merchantReference": request.reference,
            "amount": {"value": request.amount, "currency": request.currency},
            "paymentMethod": method,
            "captureImmediately": request.capture,
        }
        credential = request.stored_credential
        if credential is None:
            method["cvc"] = "{{card.cvc}}"
        else:  # an MIT: no CVC, the stored credential's network id
            body["shopperInteraction"] = "ContAuth"
            body["recurringProcessingModel"] = PROCESSING_MODELS[credential.reason]
            body["additionalData"] = {"networkTxReference": credential.network_transaction_id}
        if request.setup_future_usage:
            body["storePaymentMethod"] = True
            body["recurringProcessingModel"] = "CardOnFile"
        try:
            answer = await self.vault.forward(
                request.merchant_id,
                destination=self.name,
                path="/v1/payments",
                token=request.token,
                body=body,
                headers=self._auth,
            )
        except ForwardFailed as exc:
            outcome = Outcome.FAILED if exc.sent == "false" else Outcome.UNKNOWN
            return AuthorizeResult(outcome, failure_code=exc.code)
        return _payment(answer.status, answer.body, request.capture)

    async def inquire(self, reference: str) -> AuthorizeResult | None:
        try:
            response = await self._http.get("/v1/payments", params={"merchantReference": reference})
            body = response.json() if response.status == 200 else None
        except (HttpFailure, ValueError):
            # No answer (or none we can read) says nothing: the outcome stays unknown.
            return AuthorizeResult(Outcome.UNKNOWN, failure_code="inquiry_failed")
        if response.status == 404:
            return None
        if response.status != 200:
            return AuthorizeResult(Outcome.UNKNOWN, failure_code=f"inquiry_{response.status}")
        captured = bool(body.get("captureImmediately")) if isinstance(body, dict) else False
        return _payment(200, body, captured)

    async def capture(
        self, processor_reference: str, amount: int, currency: str, reference: str
    ) -> OperationResult:
        return await self._modify(
            f"/v1/payments/{processor_reference}/captures",
            {"merchantReference": reference, "amount": {"value": amount, "currency": currency}},
        )

    async def void(self, processor_reference: str, reference: str) -> OperationResult:
        return await self._modify(
            f"/v1/payments/{processor_reference}/cancels", {"merchantReference": reference}
        )

    async def refund(
        self, processor_reference: str, reference: str, amount: int, currency: str
    ) -> OperationResult:
        return await self._modify(
            f"/v1/payments/{processor_reference}/refunds",
            {"merchantReference": reference, "amount": {"value": amount, "currency": currency}},
        )

    async def _modify(self, path: str, body: dict[str, Any]) -> OperationResult:
        try:
            response = await self._http.post(path, json=body)
        except NotSent:
            return OperationResult(Outcome.FAILED, failure_code=NOT_SENT)
        except MaybeSent:
            return OperationResult(Outcome.UNKNOWN, failure_code="processor_timeout")
        data = response.json() if response.content else {}
        if response.status in (200, 201) and data.get("status") == "received":
            return OperationResult(Outcome.PENDING, processor_reference=data.get("pspReference"))
        code = str(data.get("errorCode", "processor_error")) if isinstance(data, dict) else ""
        if response.status >= 500:
            return OperationResult(Outcome.UNKNOWN, failure_code=code)
        return OperationResult(Outcome.FAILED, failure_code=code)

    async def close(self) -> None:
        await self._http.close()


def _payment(status: int, body: Any, captured: bool) -> AuthorizeResult:
    if status != 200 or not isinstance(body, dict):
        code = str(body.get("errorCode", "processor_error")) if isinstance(body, dict) else ""
        if 400 <= status < 500:
            return AuthorizeResult(Outcome.FAILED, failure_code=code)
        return AuthorizeResult(Outcome.UNKNOWN, failure_code=code or f"status_{status}")
    reference = body.get("pspReference")
    result = body.get("resultCode")
    if result == "Authorised":
        data = body.get("additionalData")
        nti = data.get("networkTxReference") if isinstance(data, dict) else None
        return AuthorizeResult(
            Outcome.APPROVED,
            processor_reference=reference,
            captured=captured,
            network_transaction_id=nti if isinstance(nti, str) else None,
        )
    if result == "Refused":
        data = body.get("additionalData")
        data = data if isinstance(data, dict) else {}
        raw = str(data.get("refusalReasonRaw", "")).split(":", 1)[0].strip()
        code = RAW_RESPONSE_CODES.get(raw) or REFUSAL_REASONS.get(
            str(body.get("refusalReason")), "generic_decline"
        )
        return AuthorizeResult(
            Outcome.DECLINED,
            processor_reference=reference,
            decline_code=code,
            advice_code=advice_code(data.get("merchantAdviceCode")),
            visa_category=visa_category(data.get("visaDeclineCategory")),
        )
    if result == "Error":
        return AuthorizeResult(Outcome.FAILED, failure_code="processor_error")
    return AuthorizeResult(Outcome.UNKNOWN, failure_code=f"result_{result}")
