"""The one small interface between the vault and a key management service.

The KMS holds the key-encryption key (KEK) and never lets it out: the vault hands it data keys
to wrap and unwrap. Every wrap says which KEK version did it, so rotation can find the data keys
still wrapped under an old version and `rewrap` them.
"""

from __future__ import annotations

import datetime
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


@dataclass(frozen=True)
class KekVersion:
    """One version of the KEK as the KMS describes it (the key inventory, PCI DSS 3.6.1)."""

    #: As `WrappedKey.key_version` names it, so data keys can be counted per version.
    name: str
    #: When the KMS made it (timezone-aware): its age is what its cryptoperiod is judged on.
    created: datetime.datetime
    #: The KMS's state, lower-case: "enabled", "disabled", "destroyed", "destroy_scheduled",
    #: "pending_generation", … Only an enabled version unwraps.
    state: str
    #: Whether new wraps use it.
    primary: bool


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

    async def versions(self) -> list[KekVersion]:
        """Every version of the KEK, oldest first, with its creation time and state."""
        ...

    async def close(self) -> None: ...

    @property
    def calls(self) -> int:
        """How many requests this client has sent to the KMS (tests and `make bench` count)."""
        ...
