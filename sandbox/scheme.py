"""The simulated card scheme's network transaction ids, shared by both PSP simulators.

A real network transaction id (Visa's Transaction ID, Mastercard's Trace ID) is issued by the
card scheme, not by the processor: an MIT may quote the id of a setup made through another
acquirer. The simulators model that without sharing state: an id is a random nonce and a MAC of
the nonce and the card number under the scheme's key, so either simulator can tell whether an id
was issued for the card in front of it, and the card number is never kept or derivable.

The text is lower-case base32 (letters and 2-7) after a `nti_` prefix: no long digit run, so no
card-number scanner ever mistakes one for a PAN.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable
from typing import Final

#: The simulated scheme's key. Public on purpose (the simulators are never deployed); both
#: simulators must read the same value for an id to travel between them.
SCHEME_KEY: Final = os.environ.get("TESSERA_SANDBOX_SCHEME_KEY", "tessera-sandbox-card-scheme")
PREFIX: Final = "nti_"
_NONCE_BYTES: Final = 10
_MAC_BYTES: Final = 10


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode().rstrip("=").lower()


def _mac(nonce: bytes, number: str) -> bytes:
    message = nonce + b"|" + number.encode()
    return hmac.new(SCHEME_KEY.encode(), message, hashlib.sha256).digest()[:_MAC_BYTES]


def issue(number: str) -> str:
    """A new network transaction id for an approved first transaction on `number`."""
    nonce = secrets.token_bytes(_NONCE_BYTES)
    return PREFIX + _b32(nonce + _mac(nonce, number))


def valid_for(
    network_transaction_id: str | None, number: str, predecessors: Iterable[str] = ()
) -> bool:
    """Whether the scheme issued `network_transaction_id` for this card number, or for a number
    the account updater announced this one replaced (`predecessors`): as at Visa and
    Mastercard, the original id carries over an account-updater reissue."""
    return any(_issued_for(network_transaction_id, n) for n in (number, *predecessors))


def _issued_for(network_transaction_id: str | None, number: str) -> bool:
    if not network_transaction_id or not network_transaction_id.startswith(PREFIX):
        return False
    text = network_transaction_id[len(PREFIX) :].upper()
    try:
        raw = base64.b32decode(text + "=" * (-len(text) % 8))
    except ValueError:
        return False
    if len(raw) != _NONCE_BYTES + _MAC_BYTES:
        return False
    nonce, mac = raw[:_NONCE_BYTES], raw[_NONCE_BYTES:]
    return hmac.compare_digest(mac, _mac(nonce, number))
