"""The one small interface between the vault and a key management service.

The KMS holds the key-encryption key (KEK) and never lets it out: the vault hands it data keys
to wrap and unwrap. Every wrap says which KEK version did it, so rotation can find the data keys
still wrapped under an old version and `rewrap` them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from core.errors import InternalError, ServiceUnavailable


class KmsError(InternalError):
    """The KMS refused or failed; the operation that needed it must not go on (500)."""

    default_code = "kms_error"


class KmsUnavailable(KmsError, ServiceUnavailable):
    """The KMS did not answer (outage, quota exhausted after retries): retry later (503)."""

    default_code = "kms_unavailable"


class KmsIntegrityError(KmsError):
    """A checksum or key name the KMS returned does not match: the answer was not trusted."""

    default_code = "kms_integrity_error"


@dataclass(frozen=True)
class WrappedKey:
    ciphertext: bytes
    #: The KEK version that wrapped it, as the KMS names it (for Cloud KMS the full
    #: `.../cryptoKeyVersions/N` resource name; for the local KMS the version number).
    key_version: str


class KeyManagementService(Protocol):
    async def wrap(self, plaintext: bytes, *, aad: bytes) -> WrappedKey:
        """Encrypt `plaintext` (a data key) under the primary KEK version, bound to `aad`."""
        ...

    async def unwrap(self, wrapped: WrappedKey, *, aad: bytes) -> bytes:
        """Decrypt a data key; fails unless `aad` is the one it was wrapped with."""
        ...

    async def primary_version(self) -> str:
        """The KEK version new wraps use."""
        ...

    async def rotate(self) -> str:
        """Make a new KEK version primary; older versions keep decrypting. Returns it."""
        ...

    async def close(self) -> None: ...

    @property
    def calls(self) -> int:
        """How many requests this client has sent to the KMS (tests and `make bench` count)."""
        ...
