"""Cloud KMS as the vault's KMS, through Google's own async client.

What this layer adds to the client, and why:

- CRC32C on every Encrypt and Decrypt, both ways (Google's data-integrity guidelines): a data
  key flipped in transit would silently make a card unreadable forever. Any mismatch, or a
  request checksum the service says it did not verify, raises `KmsIntegrityError`.
- The key name in every answer is pinned to the configured one: an answer naming another key
  (a misrouted or tampered response) is not trusted (`KmsIntegrityError`).
- Bounded retries of UNAVAILABLE, RESOURCE_EXHAUSTED and DEADLINE_EXCEEDED, with exponential
  backoff and full jitter and a gRPC deadline per attempt, then `KmsUnavailable`. This is a small
  loop rather than `google.api_core.retry_async.AsyncRetry`: AsyncRetry bounds retries by time
  only (no attempt cap: googleapis/python-api-core#535) and hides each attempt, while a quota
  error (RESOURCE_EXHAUSTED) wants a hard cap and `calls` must count every attempt. The
  client's own default retry is switched off (`retry=None`) so the two never multiply.
- Every other gRPC error becomes `KmsError` naming the method and the status code only, never
  the request, the response or the server's message (`from None`), so no key material or AAD can
  reach a log through an exception chain.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import google_crc32c
import grpc
from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions
from google.cloud.kms_v1 import KeyManagementServiceAsyncClient
from google.cloud.kms_v1.services.key_management_service.transports.grpc_asyncio import (
    KeyManagementServiceGrpcAsyncIOTransport,
)
from google.cloud.kms_v1.types import resources, service

from vault.kms.base import KekVersion, KmsError, KmsIntegrityError, KmsUnavailable, WrappedKey

__all__ = ["CloudKms", "RetryPolicy"]

_T = TypeVar("_T")

_KEY_NAME = re.compile(r"projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+")
_RETRYABLE = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"})
_ENABLED = resources.CryptoKeyVersion.CryptoKeyVersionState.ENABLED
_PENDING = resources.CryptoKeyVersion.CryptoKeyVersionState.PENDING_GENERATION
#: Versions per ListCryptoKeyVersions page (the service allows up to 1,000).
_LIST_PAGE_SIZE = 200


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try before saying `KmsUnavailable`. Tests shrink the delays."""

    #: Attempts per operation, the first included.
    max_attempts: int = 5
    #: Backoff ceiling before retry n is min(max_backoff, initial_backoff * multiplier**(n-1));
    #: the actual sleep is uniform in [0, ceiling] ("full jitter") so clients spread out.
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    #: gRPC deadline of each attempt, in seconds (Cloud KMS answers in milliseconds).
    call_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.call_timeout <= 0 or self.initial_backoff < 0:
            raise ValueError("RetryPolicy needs max_attempts >= 1 and positive timings")

    def backoff(self, attempt: int) -> float:
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return random.uniform(0.0, ceiling)


def _crc32c(data: bytes) -> int:
    return int(google_crc32c.value(data))


def _code_name(exc: api_exceptions.GoogleAPIError) -> str:
    code = getattr(exc, "grpc_status_code", None)
    return str(code.name) if code is not None else type(exc).__name__


def _check_key_name(key_name: str) -> None:
    if not _KEY_NAME.fullmatch(key_name):
        raise ValueError(
            f"key_name must be projects/P/locations/L/keyRings/R/cryptoKeys/K, got {key_name!r}"
        )


def _is_loopback(endpoint: str) -> bool:
    host = endpoint.rsplit(":", 1)[0].strip("[]") if ":" in endpoint else endpoint
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class CloudKms:
    """`KeyManagementService` on one Cloud KMS CryptoKey (purpose ENCRYPT_DECRYPT)."""

    def __init__(
        self,
        key_name: str,
        client: KeyManagementServiceAsyncClient,
        *,
        retry: RetryPolicy | None = None,
        primary_ttl: float = 60.0,
        version_wait: float = 30.0,
    ) -> None:
        """`key_name` is the CryptoKey (`projects/…/cryptoKeys/…`), not a version of it.

        `primary_ttl`: how long `primary_version()` trusts its last answer (rotation elsewhere
        shows up within that time). `version_wait`: how long `rotate()` waits for a new version
        still being generated (HSM keys) before giving up.
        """
        _check_key_name(key_name)
        self._key_name = key_name
        self._version_prefix = key_name + "/cryptoKeyVersions/"
        self._client = client
        self._retry = retry or RetryPolicy()
        self._primary_ttl = primary_ttl
        self._version_wait = version_wait
        self._primary: tuple[str, float] | None = None
        self._calls = 0

    @classmethod
    async def connect(
        cls,
        key_name: str,
        *,
        endpoint: str | None = None,
        retry: RetryPolicy | None = None,
        primary_ttl: float = 60.0,
        version_wait: float = 30.0,
    ) -> CloudKms:
        """A client on Cloud KMS (ADC credentials, TLS), or on a plain-gRPC `endpoint`.

        `endpoint` (`host:port`) is for tests and a local stand-in server: it uses an insecure
        channel, so it must be a loopback address. A coroutine so that the gRPC asyncio channel
        is made on the running loop, the one that will use it.
        """
        _check_key_name(key_name)  # before a channel exists that would then leak
        if endpoint is None:
            try:
                client = KeyManagementServiceAsyncClient()
            except auth_exceptions.GoogleAuthError as exc:
                raise KmsError(
                    f"Cloud KMS: no usable Google credentials ({type(exc).__name__}); "
                    "set up Application Default Credentials"
                ) from None
        else:
            if not _is_loopback(endpoint):
                raise ValueError(
                    f"refusing a plaintext gRPC channel to {endpoint!r}: only loopback endpoints"
                )
            channel = grpc.aio.insecure_channel(endpoint)
            transport = KeyManagementServiceGrpcAsyncIOTransport(channel=channel)
            client = KeyManagementServiceAsyncClient(transport=transport)
        return cls(
            key_name, client, retry=retry, primary_ttl=primary_ttl, version_wait=version_wait
        )

    @property
    def key_name(self) -> str:
        return self._key_name

    @property
    def calls(self) -> int:
        """RPCs sent, each retry included (what Cloud KMS quota and billing count)."""
        return self._calls

    async def wrap(self, plaintext: bytes, *, aad: bytes) -> WrappedKey:
        """Encrypt under the key's primary version; `key_version` is the full version name."""
        request = service.EncryptRequest(
            name=self._key_name,
            plaintext=plaintext,
            additional_authenticated_data=aad,
            plaintext_crc32c=_crc32c(plaintext),
            additional_authenticated_data_crc32c=_crc32c(aad),
        )
        response = await self._rpc("Encrypt", self._client.encrypt, request)
        if not (
            response.verified_plaintext_crc32c
            and response.verified_additional_authenticated_data_crc32c
        ):
            raise KmsIntegrityError("Cloud KMS Encrypt: the service did not verify our checksums")
        if response.ciphertext_crc32c != _crc32c(response.ciphertext):
            raise KmsIntegrityError("Cloud KMS Encrypt: ciphertext checksum mismatch")
        version = self._pinned(response.name, "Encrypt")
        self._primary = (version, time.monotonic())  # the service just told us the primary
        return WrappedKey(ciphertext=response.ciphertext, key_version=version)

    async def unwrap(self, wrapped: WrappedKey, *, aad: bytes) -> bytes:
        """Decrypt; Cloud KMS finds the version in the ciphertext itself."""
        if not wrapped.key_version.startswith(self._version_prefix):
            raise KmsError("Cloud KMS: this data key was wrapped under another key")
        request = service.DecryptRequest(
            name=self._key_name,
            ciphertext=wrapped.ciphertext,
            additional_authenticated_data=aad,
            ciphertext_crc32c=_crc32c(wrapped.ciphertext),
            additional_authenticated_data_crc32c=_crc32c(aad),
        )
        response = await self._rpc("Decrypt", self._client.decrypt, request)
        # DecryptResponse has no verified_* fields: the service rejects a request whose
        # checksums do not match (INVALID_ARGUMENT), so only the answer is left to check.
        if response.plaintext_crc32c != _crc32c(response.plaintext):
            raise KmsIntegrityError("Cloud KMS Decrypt: plaintext checksum mismatch")
        plaintext: bytes = response.plaintext
        return plaintext

    async def primary_version(self) -> str:
        """The primary version's full name (GetCryptoKey, cached for `primary_ttl` seconds)."""
        if self._primary is not None:
            version, fetched = self._primary
            if time.monotonic() - fetched < self._primary_ttl:
                return version
        request = service.GetCryptoKeyRequest(name=self._key_name)
        key = await self._rpc("GetCryptoKey", self._client.get_crypto_key, request)
        return self._remember_primary(key, "GetCryptoKey")

    async def rotate(self) -> str:
        """Create a new version and make it primary; returns its full name.

        Needs `cloudkms.cryptoKeyVersions.create` and `cloudkms.cryptoKeys.update` (e.g.
        roles/cloudkms.admin). In production the vault's runtime service account has only
        encrypt/decrypt (roles/cloudkms.cryptoKeyEncrypterDecrypter): rotation is Cloud KMS's
        rotation schedule or an operator's job, and this call then fails with PERMISSION_DENIED.
        A retried CreateCryptoKeyVersion may leave one extra, never-primary version: harmless.
        """
        create = service.CreateCryptoKeyVersionRequest(
            parent=self._key_name, crypto_key_version=resources.CryptoKeyVersion()
        )
        created = await self._rpc(
            "CreateCryptoKeyVersion", self._client.create_crypto_key_version, create
        )
        version = self._pinned(created.name, "CreateCryptoKeyVersion")
        await self._wait_enabled(version, created.state)
        update = service.UpdateCryptoKeyPrimaryVersionRequest(
            name=self._key_name, crypto_key_version_id=version.rsplit("/", 1)[1]
        )
        key = await self._rpc(
            "UpdateCryptoKeyPrimaryVersion", self._client.update_crypto_key_primary_version, update
        )
        if self._remember_primary(key, "UpdateCryptoKeyPrimaryVersion") != version:
            raise KmsIntegrityError("Cloud KMS: the new version did not become primary")
        return version

    async def versions(self) -> list[KekVersion]:
        """Every version of the key (ListCryptoKeyVersions, page by page), oldest first.

        Needs `cloudkms.cryptoKeyVersions.list` and `cloudkms.cryptoKeys.get` (e.g.
        roles/cloudkms.viewer) besides encrypt/decrypt. The primary is asked for afresh
        (GetCryptoKey), not taken from the cache `primary_version()` keeps.
        """
        key = await self._rpc(
            "GetCryptoKey",
            self._client.get_crypto_key,
            service.GetCryptoKeyRequest(name=self._key_name),
        )
        primary = self._remember_primary(key, "GetCryptoKey")
        found: list[KekVersion] = []
        page_token = ""
        while True:
            request = service.ListCryptoKeyVersionsRequest(
                parent=self._key_name, page_size=_LIST_PAGE_SIZE, page_token=page_token
            )
            # The pager's attributes are the first page's; the pages are walked here, each
            # through `_rpc` (counted, retried), not by the pager behind our back.
            page = await self._rpc(
                "ListCryptoKeyVersions", self._client.list_crypto_key_versions, request
            )
            for version in page.crypto_key_versions:
                name = self._pinned(version.name, "ListCryptoKeyVersions")
                created = version.create_time
                if not isinstance(created, datetime.datetime) or created.tzinfo is None:
                    raise KmsIntegrityError(f"Cloud KMS: version {name} has no create_time")
                # A plain datetime (the client's DatetimeWithNanoseconds is a subclass).
                created = datetime.datetime.fromtimestamp(created.timestamp(), datetime.UTC)
                state = resources.CryptoKeyVersion.CryptoKeyVersionState(version.state)
                found.append(KekVersion(name, created, state.name.lower(), name == primary))
            page_token = page.next_page_token
            if not page_token:
                break
        found.sort(key=lambda v: int(v.name.rsplit("/", 1)[1]))
        return found

    async def close(self) -> None:
        close: Callable[[], Awaitable[None]] = self._client.transport.close
        await close()

    async def _wait_enabled(
        self, version: str, state: resources.CryptoKeyVersion.CryptoKeyVersionState
    ) -> None:
        """HSM versions start in PENDING_GENERATION; only an ENABLED one can become primary."""
        deadline = time.monotonic() + self._version_wait
        delay = 0.05
        while state == _PENDING and time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
            request = service.GetCryptoKeyVersionRequest(name=version)
            current = await self._rpc(
                "GetCryptoKeyVersion", self._client.get_crypto_key_version, request
            )
            state = current.state
        if state != _ENABLED:
            raise KmsError(f"Cloud KMS: new key version is {state.name}, not ENABLED")

    def _pinned(self, name: str, method: str) -> str:
        """`name` if it is a version of the configured key, else the answer is not trusted."""
        suffix = name[len(self._version_prefix) :]
        if not name.startswith(self._version_prefix) or not suffix or "/" in suffix:
            raise KmsIntegrityError(f"Cloud KMS {method}: the answer names another key")
        return name

    def _remember_primary(self, key: resources.CryptoKey, method: str) -> str:
        if key.name != self._key_name:
            raise KmsIntegrityError(f"Cloud KMS {method}: the answer names another key")
        if not key.primary.name:
            raise KmsError(f"Cloud KMS {method}: the key has no primary version")
        version = self._pinned(key.primary.name, method)
        self._primary = (version, time.monotonic())
        return version

    async def _rpc(self, method: str, send: Callable[..., Awaitable[_T]], request: object) -> _T:
        """Send with bounded retries of transient errors; map every failure to a KmsError.

        `send` is a client method; its own retry is off so the two never multiply.
        """
        for attempt in range(1, self._retry.max_attempts + 1):
            self._calls += 1
            try:
                return await send(request=request, retry=None, timeout=self._retry.call_timeout)
            except api_exceptions.GoogleAPIError as exc:
                code = _code_name(exc)
            except auth_exceptions.GoogleAuthError as exc:
                code = type(exc).__name__  # credentials could not be obtained or refreshed
            if code not in _RETRYABLE:
                raise KmsError(f"Cloud KMS {method} failed: {code}")
            if attempt == self._retry.max_attempts:
                raise KmsUnavailable(f"Cloud KMS {method}: {code} after {attempt} attempts")
            await asyncio.sleep(self._retry.backoff(attempt))
        raise AssertionError("unreachable")  # the loop always returns or raises
