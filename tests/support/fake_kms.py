"""A Cloud KMS stand-in: a real gRPC server on loopback, speaking the service's own messages.

There is no official Cloud KMS emulator. This one serves the methods the vault uses with the
google-cloud-kms message types, so the unmodified async client (and all of `CloudKms`: CRC32C,
key-name pinning, retries) is exercised over a real socket. It behaves like the real service
where the vault depends on it:

- per CryptoKey, versions with real AES-256-GCM keys; the ciphertext starts with the version
  number (4 bytes), so Decrypt finds the version like the real service does;
- AAD is enforced; a request checksum that does not match its data is INVALID_ARGUMENT, and the
  `verified_*` flags are true only when the request sent a checksum (that matched);
- a disabled version makes Decrypt (and Encrypt, if primary) FAILED_PRECONDITION;
- every version has a `create_time` (settable, to age a version), and ListCryptoKeyVersions
  pages through them with `page_token`s like the real service.

Faults a test can inject: the next N calls fail with a status, checksums in answers are
corrupted, answers name another key, every call is slowed down, new versions stay
PENDING_GENERATION for a few polls. `calls` counts calls per method and `requests` keeps them.

It runs on a thread-pool `grpc.server`, not `grpc.aio`, so it never depends on the test's event
loop (the suite shares one loop per session).

    with FakeKms.start(KEY) as fake:
        kms = CloudKms.connect(KEY, endpoint=fake.address)
"""

from __future__ import annotations

import datetime
import os
import threading
from collections import Counter
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import google_crc32c
import grpc
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.cloud.kms_v1.types import resources, service

SERVICE = "google.cloud.kms.v1.KeyManagementService"
State = resources.CryptoKeyVersion.CryptoKeyVersionState
_VERSION_BYTES = 4
_NONCE_BYTES = 12
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


def crc32c(data: bytes) -> int:
    return int(google_crc32c.value(data))


@dataclass
class _Version:
    number: int
    key: bytes
    #: A `State` value (proto-plus enums are ints to the type checker).
    state: int
    #: GetCryptoKeyVersion answers PENDING_GENERATION this many more times.
    pending_polls: int = 0
    created: datetime.datetime = field(default_factory=lambda: datetime.datetime.now(datetime.UTC))


@dataclass
class _Key:
    name: str
    versions: dict[int, _Version] = field(default_factory=dict)
    primary: int = 0

    def version_name(self, number: int) -> str:
        return f"{self.name}/cryptoKeyVersions/{number}"

    def add_version(self, pending_polls: int = 0) -> _Version:
        number = max(self.versions, default=0) + 1
        state = State.PENDING_GENERATION if pending_polls else State.ENABLED
        version = _Version(number, AESGCM.generate_key(bit_length=256), state, pending_polls)
        self.versions[number] = version
        return version


class FakeKms:
    """The server, its keys, the injected faults and what it saw. Start with `FakeKms.start`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._keys: dict[str, _Key] = {}
        self._failures: list[tuple[str | None, Any]] = []
        self.calls: Counter[str] = Counter()
        self.requests: dict[str, list[Any]] = {}
        #: Faults: flip the CRC32C of every answer's ciphertext/plaintext.
        self.corrupt_checksums = False
        #: Faults: answer `verified_*_crc32c = False` (as if our checksums never arrived).
        self.skip_verification = False
        #: Faults: answers name this key instead of the one asked for.
        self.answer_key_name: str | None = None
        #: Faults: seconds every call waits before answering.
        self.latency = 0.0
        #: Faults: new versions stay PENDING_GENERATION for this many GetCryptoKeyVersion calls.
        self.pending_polls = 0
        #: ListCryptoKeyVersions answers at most this many versions per page (tests make it
        #: small to walk several pages).
        self.max_page_size = 1000
        self._server: Any = None
        self.address = ""

    # --- life cycle -----------------------------------------------------------------------

    @classmethod
    def start(cls, *key_names: str, host: str = "127.0.0.1", port: int = 0) -> FakeKms:
        """Serve on `host` (loopback unless a test puts it in its own network segment) and
        `port` (0: a free one); `address` is its `host:port`."""
        fake = cls()
        for name in key_names:
            fake.create_key(name)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        server.add_generic_rpc_handlers((fake._handlers(),))
        bound = server.add_insecure_port(f"{host}:{port}")
        server.start()
        fake._server = server
        fake.address = f"{host}:{bound}"
        return fake

    def stop(self) -> None:
        self._stopping.set()  # wakes handlers sleeping on `latency`
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None

    def __enter__(self) -> FakeKms:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- test controls --------------------------------------------------------------------

    def create_key(self, name: str) -> str:
        """A CryptoKey with one enabled primary version; returns that version's name."""
        with self._lock:
            key = self._keys[name] = _Key(name)
            key.primary = key.add_version().number
            return key.version_name(key.primary)

    def set_state(self, version_name: str, state: int) -> None:
        """Enable or disable a version directly (the RPC is UpdateCryptoKeyVersion)."""
        with self._lock:
            key, number = self._find_version(version_name)
            key.versions[number].state = state

    def set_created(self, version_name: str, created: datetime.datetime) -> None:
        """Back-date (or move) a version's create_time, as if it had been made then."""
        with self._lock:
            key, number = self._find_version(version_name)
            key.versions[number].created = created

    def primary_of(self, key_name: str) -> str:
        with self._lock:
            key = self._keys[key_name]
            return key.version_name(key.primary)

    def fail_next(
        self, count: int, code: Any = grpc.StatusCode.UNAVAILABLE, *, method: str | None = None
    ) -> None:
        """The next `count` calls (of `method`, e.g. "Encrypt", or of any) fail with `code`."""
        with self._lock:
            self._failures.extend([(method, code)] * count)

    def reset_faults(self) -> None:
        with self._lock:
            self._failures.clear()
        self.corrupt_checksums = self.skip_verification = False
        self.answer_key_name = None
        self.latency = 0.0
        self.pending_polls = 0

    # --- the service ----------------------------------------------------------------------

    def _handlers(self) -> Any:
        methods: dict[str, Any] = {
            "Encrypt": self._unary(
                "Encrypt", self._encrypt, service.EncryptRequest, service.EncryptResponse
            ),
            "Decrypt": self._unary(
                "Decrypt", self._decrypt, service.DecryptRequest, service.DecryptResponse
            ),
            "GetCryptoKey": self._unary(
                "GetCryptoKey",
                self._get_crypto_key,
                service.GetCryptoKeyRequest,
                resources.CryptoKey,
            ),
            "GetCryptoKeyVersion": self._unary(
                "GetCryptoKeyVersion",
                self._get_crypto_key_version,
                service.GetCryptoKeyVersionRequest,
                resources.CryptoKeyVersion,
            ),
            "CreateCryptoKeyVersion": self._unary(
                "CreateCryptoKeyVersion",
                self._create_crypto_key_version,
                service.CreateCryptoKeyVersionRequest,
                resources.CryptoKeyVersion,
            ),
            "UpdateCryptoKeyPrimaryVersion": self._unary(
                "UpdateCryptoKeyPrimaryVersion",
                self._update_primary,
                service.UpdateCryptoKeyPrimaryVersionRequest,
                resources.CryptoKey,
            ),
            "ListCryptoKeyVersions": self._unary(
                "ListCryptoKeyVersions",
                self._list_crypto_key_versions,
                service.ListCryptoKeyVersionsRequest,
                service.ListCryptoKeyVersionsResponse,
            ),
            "UpdateCryptoKeyVersion": self._unary(
                "UpdateCryptoKeyVersion",
                self._update_crypto_key_version,
                service.UpdateCryptoKeyVersionRequest,
                resources.CryptoKeyVersion,
            ),
        }
        return grpc.method_handlers_generic_handler(SERVICE, methods)

    def _unary(
        self,
        name: str,
        fn: Callable[[_Req, Any], _Resp],
        request_type: Any,
        response_type: Any,
    ) -> Any:
        """A handler that counts, records and applies the injected faults, then runs `fn`."""

        def handle(request: _Req, context: Any) -> _Resp:
            with self._lock:
                self.calls[name] += 1
                self.requests.setdefault(name, []).append(request)
                failure = next(
                    (i for i, (m, _) in enumerate(self._failures) if m in (None, name)), None
                )
                code = self._failures.pop(failure)[1] if failure is not None else None
            if self.latency:
                self._stopping.wait(self.latency)
            if code is not None:
                context.abort(code, f"injected {code.name}")
            return fn(request, context)

        return grpc.unary_unary_rpc_method_handler(
            handle,
            # proto-plus classes (de)serialize themselves: the wire format of the real service.
            request_deserializer=request_type.deserialize,
            response_serializer=response_type.serialize,
        )

    def _key(self, name: str, context: Any) -> _Key:
        key = self._keys.get(name)
        if key is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"{name} not found.")
        assert key is not None
        return key

    def _find_version(self, version_name: str, context: Any = None) -> tuple[_Key, int]:
        key_name, _, number = version_name.rpartition("/cryptoKeyVersions/")
        key = self._keys.get(key_name)
        if key is None or not number.isdigit() or int(number) not in key.versions:
            if context is None:
                raise KeyError(version_name)
            context.abort(grpc.StatusCode.NOT_FOUND, f"{version_name} not found.")
        assert key is not None
        return key, int(number)

    def _check_crc(self, request: Any, data_field: str, crc_field: str, context: Any) -> bool:
        """Like the real service: a sent checksum must match (else INVALID_ARGUMENT)."""
        if crc_field not in request:
            return False
        if getattr(request, crc_field) != crc32c(getattr(request, data_field)):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"The checksum in field {crc_field} did not match the data in field {data_field}.",
            )
        return True

    def _answer_name(self, name: str) -> str:
        wrong = self.answer_key_name
        return name if wrong is None else wrong + name[name.find("/cryptoKeyVersions/") :]

    def _version_resource(self, key: _Key, number: int) -> resources.CryptoKeyVersion:
        version = key.versions[number]
        return resources.CryptoKeyVersion(
            name=self._answer_name(key.version_name(number)),
            state=version.state,
            create_time=version.created,
            protection_level=resources.ProtectionLevel.SOFTWARE,
            algorithm=resources.CryptoKeyVersion.CryptoKeyVersionAlgorithm.GOOGLE_SYMMETRIC_ENCRYPTION,
        )

    def _key_resource(self, key: _Key) -> resources.CryptoKey:
        return resources.CryptoKey(
            name=self.answer_key_name or key.name,
            purpose=resources.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT,
            primary=self._version_resource(key, key.primary),
        )

    def _encrypt(self, request: service.EncryptRequest, context: Any) -> service.EncryptResponse:
        verified_plaintext = self._check_crc(request, "plaintext", "plaintext_crc32c", context)
        verified_aad = self._check_crc(
            request,
            "additional_authenticated_data",
            "additional_authenticated_data_crc32c",
            context,
        )
        with self._lock:
            if "/cryptoKeyVersions/" in request.name:
                key, number = self._find_version(request.name, context)
            else:
                key = self._key(request.name, context)
                number = key.primary
            version = key.versions[number]
            if version.state != State.ENABLED:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{key.version_name(number)} is not enabled, current state is: "
                    f"{State(version.state).name}.",
                )
            nonce = os.urandom(_NONCE_BYTES)
            sealed = AESGCM(version.key).encrypt(
                nonce, request.plaintext, request.additional_authenticated_data
            )
            name = key.version_name(number)
        ciphertext = number.to_bytes(_VERSION_BYTES, "big") + nonce + sealed
        return service.EncryptResponse(
            name=self._answer_name(name),
            ciphertext=ciphertext,
            ciphertext_crc32c=crc32c(ciphertext) ^ int(self.corrupt_checksums),
            verified_plaintext_crc32c=verified_plaintext and not self.skip_verification,
            verified_additional_authenticated_data_crc32c=verified_aad
            and not self.skip_verification,
            protection_level=resources.ProtectionLevel.SOFTWARE,
        )

    def _decrypt(self, request: service.DecryptRequest, context: Any) -> service.DecryptResponse:
        self._check_crc(request, "ciphertext", "ciphertext_crc32c", context)
        self._check_crc(
            request,
            "additional_authenticated_data",
            "additional_authenticated_data_crc32c",
            context,
        )
        invalid = "Decryption failed: the ciphertext is invalid."
        with self._lock:
            key = self._key(request.name, context)
            data = request.ciphertext
            number = int.from_bytes(data[:_VERSION_BYTES], "big")
            version = key.versions.get(number)
            if version is None or len(data) < _VERSION_BYTES + _NONCE_BYTES + 16:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, invalid)
            assert version is not None
            if version.state != State.ENABLED:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"The request cannot be fulfilled. Resource {key.version_name(number)} has "
                    f"value {State(version.state).name} in field crypto_key_version.state.",
                )
            used_primary = number == key.primary
            material = version.key
        nonce = data[_VERSION_BYTES : _VERSION_BYTES + _NONCE_BYTES]
        try:
            plaintext = AESGCM(material).decrypt(
                nonce, data[_VERSION_BYTES + _NONCE_BYTES :], request.additional_authenticated_data
            )
        except InvalidTag:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, invalid)
            raise  # abort raises; this keeps `plaintext` bound for the type checker
        return service.DecryptResponse(
            plaintext=plaintext,
            plaintext_crc32c=crc32c(plaintext) ^ int(self.corrupt_checksums),
            used_primary=used_primary,
            protection_level=resources.ProtectionLevel.SOFTWARE,
        )

    def _get_crypto_key(
        self, request: service.GetCryptoKeyRequest, context: Any
    ) -> resources.CryptoKey:
        with self._lock:
            return self._key_resource(self._key(request.name, context))

    def _get_crypto_key_version(
        self, request: service.GetCryptoKeyVersionRequest, context: Any
    ) -> resources.CryptoKeyVersion:
        with self._lock:
            key, number = self._find_version(request.name, context)
            version = key.versions[number]
            if version.pending_polls:
                version.pending_polls -= 1
                if not version.pending_polls:
                    version.state = State.ENABLED
            return self._version_resource(key, number)

    def _list_crypto_key_versions(
        self, request: service.ListCryptoKeyVersionsRequest, context: Any
    ) -> service.ListCryptoKeyVersionsResponse:
        """In version order; the page token is the offset of the next page (opaque to clients)."""
        with self._lock:
            key = self._key(request.parent, context)
            numbers = sorted(key.versions)
            token = request.page_token
            if token and not token.isdigit():
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "invalid page_token.")
            start = int(token or 0)
            size = min(request.page_size or self.max_page_size, self.max_page_size)
            page = numbers[start : start + size]
            following = start + size if start + size < len(numbers) else None
            return service.ListCryptoKeyVersionsResponse(
                crypto_key_versions=[self._version_resource(key, n) for n in page],
                next_page_token=str(following) if following is not None else "",
                total_size=len(numbers),
            )

    def _create_crypto_key_version(
        self, request: service.CreateCryptoKeyVersionRequest, context: Any
    ) -> resources.CryptoKeyVersion:
        with self._lock:
            key = self._key(request.parent, context)
            version = key.add_version(pending_polls=self.pending_polls)
            return self._version_resource(key, version.number)

    def _update_primary(
        self, request: service.UpdateCryptoKeyPrimaryVersionRequest, context: Any
    ) -> resources.CryptoKey:
        with self._lock:
            key = self._key(request.name, context)
            version = key.versions.get(int(request.crypto_key_version_id))
            if version is None:
                context.abort(grpc.StatusCode.NOT_FOUND, "version not found.")
            assert version is not None
            if version.state != State.ENABLED:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "version is not enabled.")
            key.primary = version.number
            return self._key_resource(key)

    def _update_crypto_key_version(
        self, request: service.UpdateCryptoKeyVersionRequest, context: Any
    ) -> resources.CryptoKeyVersion:
        if list(request.update_mask.paths) != ["state"] or request.crypto_key_version.state not in (
            State.ENABLED,
            State.DISABLED,
        ):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "only state ENABLED/DISABLED.")
        with self._lock:
            key, number = self._find_version(request.crypto_key_version.name, context)
            key.versions[number].state = request.crypto_key_version.state
            return self._version_resource(key, number)
