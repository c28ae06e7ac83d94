"""PSP A: a JSON processor (the simulator in `sandbox/psp_a.py` speaks its protocol).

Wire format: amounts in minor units, our reference in `reference`, statuses `approved`,
`captured`, `declined` (with `decline_code`), `voided`; a 5xx with `processing_error` means
PSP A did not process the request. Authorizations travel through the vault's forwarding proxy.
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

DECLINE_CODES = {
    "do_not_honor": "do_not_honor",
    "insufficient_funds": "insufficient_funds",
    "expired_card": "expired_card",
    "incorrect_cvc": "incorrect_cvc",
    "lost_card": "lost_card",
    "stolen_card": "stolen_card",
    "closed_account": "closed_account",
    "stop_recurring": "stop_recurring",
    "revocation_of_authorization": "revocation_of_authorization",
    "issuer_unavailable": "issuer_unavailable",
    # The scheme's stored-credential rules (sandbox/README.md).
    "authentication_required": "authentication_required",
    "transaction_not_allowed": "transaction_not_allowed",
}


class PspAConnector:
    name = "psp_a"

    def __init__(
        self,
        vault: VaultClient,
        *,
        base_url: str,
        api_key: str,
        timeout_seconds: float,
    ) -> None:
        self.vault = vault
        self._auth = {"Authorization": f"Bearer {api_key}"}
        self._http = processor_client(base_url, self._auth, timeout_seconds)

    async def authorize(self, request: AuthorizeRequest) -> AuthorizeResult:
        card = {
            "number": "{{card.number}}",
            "exp_month": "{{card.exp_month}}",
            "exp_year": "{{card.exp_year}}",
            "holder": "{{card.name}}",
        }
        if request.stored_credential is None:
            # An MIT goes without: the customer is not there, and the CVC is never stored.
            card["cvc"] = "{{card.cvc}}"
        body: dict[str, Any] = {
            "reference": request.reference,
            "amount": request.amount,
            "currency": request.currency,
            "capture": request.capture,
            "card": card,
        }
        if request.setup_future_usage:
            body["setup_future_usage"] = "off_session"
        if request.stored_credential is not None:
            body["payment_method_options"] = {
                "card": {
                    "mit_exemption": {
                        "reason": request.stored_credential.reason,
                        "network_transaction_id": request.stored_credential.network_transaction_id,
                    }
                }
            }
        try:
            answer = await self.vault.forward(
                request.merchant_id,
                destination=self.name,
                path="/v1/authorizations",
                token=request.token,
                body=body,
                headers=self._auth,
            )
        except ForwardFailed as exc:
            if exc.sent == "false":
                return AuthorizeResult(Outcome.FAILED, failure_code=exc.code)
            return AuthorizeResult(Outcome.UNKNOWN, failure_code=exc.code)
        return _authorization(answer.status, answer.body)

    async def inquire(self, reference: str) -> AuthorizeResult | None:
        try:
            response = await self._http.get("/v1/authorizations", params={"reference": reference})
            body = response.json() if response.status == 200 else None
        except (HttpFailure, ValueError):
            # No answer (or none we can read) says nothing: the outcome stays unknown.
            return AuthorizeResult(Outcome.UNKNOWN, failure_code="inquiry_failed")
        if response.status == 404:
            return None
        if response.status != 200:
            return AuthorizeResult(Outcome.UNKNOWN, failure_code=f"inquiry_{response.status}")
        return _authorization(200, body)

    async def capture(
        self, processor_reference: str, amount: int, currency: str, reference: str
    ) -> OperationResult:
        return await self._operation(
            f"/v1/authorizations/{processor_reference}/capture", {"amount": amount}
        )

    async def void(self, processor_reference: str, reference: str) -> OperationResult:
        return await self._operation(f"/v1/authorizations/{processor_reference}/void", {})

    async def refund(
        self, processor_reference: str, reference: str, amount: int, currency: str
    ) -> OperationResult:
        return await self._operation(
            f"/v1/authorizations/{processor_reference}/refunds",
            {"reference": reference, "amount": amount},
        )

    async def _operation(self, path: str, body: dict[str, Any]) -> OperationResult:
        try:
            response = await self._http.post(path, json=body)
        except NotSent:
            return OperationResult(Outcome.FAILED, failure_code=NOT_SENT)
        except MaybeSent:
            return OperationResult(Outcome.UNKNOWN, failure_code="processor_timeout")
        if response.status in (200, 201):
            data = response.json()
            return OperationResult(Outcome.APPROVED, processor_reference=data.get("id"))
        code = _error_code(response.json() if response.content else None)
        if response.status >= 500 and code != "processing_error":
            return OperationResult(Outcome.UNKNOWN, failure_code=code)
        return OperationResult(Outcome.FAILED, failure_code=code)

    async def close(self) -> None:
        await self._http.close()


def _error_code(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("code", "processor_error"))
    return "processor_error"


def _authorization(status: int, body: Any) -> AuthorizeResult:
    if status in (200, 201) and isinstance(body, dict):
        psp_status = body.get("status")
        reference = body.get("id")
        if psp_status in ("approved", "captured"):
            nti = body.get("network_transaction_id")
            return AuthorizeResult(
                Outcome.APPROVED,
                processor_reference=reference,
                captured=psp_status == "captured",
                network_transaction_id=nti if isinstance(nti, str) else None,
            )
        if psp_status == "declined":
            code = DECLINE_CODES.get(str(body.get("decline_code")), "generic_decline")
            return AuthorizeResult(
                Outcome.DECLINED,
                processor_reference=reference,
                decline_code=code,
                advice_code=advice_code(body.get("network_advice_code")),
                visa_category=visa_category(body.get("visa_decline_category")),
            )
        return AuthorizeResult(Outcome.UNKNOWN, failure_code=f"unexpected_status_{psp_status}")
    code = _error_code(body)
    if status >= 500 and code == "processing_error":
        return AuthorizeResult(Outcome.FAILED, failure_code="processor_error")
    if 400 <= status < 500:
        return AuthorizeResult(Outcome.FAILED, failure_code=code)
    return AuthorizeResult(Outcome.UNKNOWN, failure_code=code)
