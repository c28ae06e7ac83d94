"""Cloud KMS through Google's own async client, against a fake service on a real gRPC socket."""

from __future__ import annotations

import datetime
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from google.cloud.kms_v1 import KeyManagementServiceAsyncClient
from google.cloud.kms_v1.services.key_management_service.transports.grpc_asyncio import (
    KeyManagementServiceGrpcAsyncIOTransport,
)
from google.cloud.kms_v1.types import resources

from tests.support.fake_kms import FakeKms, State, crc32c
from vault.kms.base import (
    KeyManagementService,
    KmsError,
    KmsIntegrityError,
    KmsUnavailable,
    WrappedKey,
)
from vault.kms.gcp import CloudKms, RetryPolicy
from vault.kms.local import LocalKms

KEY = "projects/tessera-test/locations/europe-west1/keyRings/vault/cryptoKeys/kek"
OTHER_KEY = "projects/attacker/locations/europe-west1/keyRings/vault/cryptoKeys/kek"
DEK = bytes(range(32))
AAD = b"tok_123|mer_456|dek_1"
#: Real retries, tiny sleeps: the suite stays fast and the behaviour is the production one.
FAST = RetryPolicy(max_attempts=4, initial_backoff=0.001, max_backoff=0.005, call_timeout=2.0)


@pytest.fixture
def fake() -> Iterator[FakeKms]:
    with FakeKms.start(KEY) as server:
        yield server


@pytest.fixture
async def kms(fake: FakeKms) -> AsyncIterator[CloudKms]:
    client = await CloudKms.connect(KEY, endpoint=fake.address, retry=FAST)
    yield client
    await client.close()


async def disable_through_the_api(fake: FakeKms, version: str) -> None:
    """What an operator does (UpdateCryptoKeyVersion), through the real client."""
    channel = grpc.aio.insecure_channel(fake.address)
    admin = KeyManagementServiceAsyncClient(
        transport=KeyManagementServiceGrpcAsyncIOTransport(channel=channel)
    )
    await admin.update_crypto_key_version(
        request={
            "crypto_key_version": resources.CryptoKeyVersion(name=version, state=State.DISABLED),
            "update_mask": {"paths": ["state"]},
        }
    )
    await channel.close()


async def test_a_wrapped_key_unwraps_with_the_same_aad(kms: CloudKms) -> None:
    wrapped = await kms.wrap(DEK, aad=AAD)
    assert wrapped.key_version == f"{KEY}/cryptoKeyVersions/1"
    assert DEK not in wrapped.ciphertext
    assert await kms.unwrap(wrapped, aad=AAD) == DEK


async def test_unwrapping_with_another_aad_fails_with_the_status_only(kms: CloudKms) -> None:
    wrapped = await kms.wrap(DEK, aad=AAD)
    with pytest.raises(KmsError) as caught:
        await kms.unwrap(wrapped, aad=b"tok_999|mer_456|dek_1")
    assert type(caught.value) is KmsError
    assert str(caught.value) == "Cloud KMS Decrypt failed: INVALID_ARGUMENT"
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None


async def test_every_request_carries_crc32c_checksums(kms: CloudKms, fake: FakeKms) -> None:
    wrapped = await kms.wrap(DEK, aad=AAD)
    await kms.unwrap(wrapped, aad=AAD)
    encrypt = fake.requests["Encrypt"][0]
    assert encrypt.plaintext_crc32c == crc32c(DEK)
    assert encrypt.additional_authenticated_data_crc32c == crc32c(AAD)
    decrypt = fake.requests["Decrypt"][0]
    assert decrypt.ciphertext_crc32c == crc32c(wrapped.ciphertext)
    assert decrypt.additional_authenticated_data_crc32c == crc32c(AAD)


async def test_an_empty_aad_is_checksummed_too(kms: CloudKms, fake: FakeKms) -> None:
    wrapped = await kms.wrap(DEK, aad=b"")
    assert await kms.unwrap(wrapped, aad=b"") == DEK
    assert "additional_authenticated_data_crc32c" in fake.requests["Encrypt"][0]


async def test_a_corrupted_checksum_in_an_answer_is_an_integrity_error(
    kms: CloudKms, fake: FakeKms
) -> None:
    wrapped = await kms.wrap(DEK, aad=AAD)
    fake.corrupt_checksums = True
    with pytest.raises(KmsIntegrityError, match="Encrypt: ciphertext checksum"):
        await kms.wrap(DEK, aad=AAD)
    with pytest.raises(KmsIntegrityError, match="Decrypt: plaintext checksum"):
        await kms.unwrap(wrapped, aad=AAD)


async def test_an_answer_that_did_not_verify_our_checksums_is_an_integrity_error(
    kms: CloudKms, fake: FakeKms
) -> None:
    fake.skip_verification = True
    with pytest.raises(KmsIntegrityError, match="did not verify"):
        await kms.wrap(DEK, aad=AAD)


async def test_an_answer_naming_another_key_is_an_integrity_error(
    kms: CloudKms, fake: FakeKms
) -> None:
    fake.answer_key_name = OTHER_KEY
    with pytest.raises(KmsIntegrityError, match="names another key"):
        await kms.wrap(DEK, aad=AAD)
    with pytest.raises(KmsIntegrityError, match="names another key"):
        await kms.primary_version()


async def test_a_key_wrapped_under_another_key_is_refused_without_a_call(kms: CloudKms) -> None:
    wrapped = await kms.wrap(DEK, aad=AAD)
    foreign = replace(wrapped, key_version=f"{OTHER_KEY}/cryptoKeyVersions/1")
    with pytest.raises(KmsError, match="another key"):
        await kms.unwrap(foreign, aad=AAD)
    assert kms.calls == 1


async def test_unavailable_twice_then_success_succeeds_and_counts_the_retries(
    kms: CloudKms, fake: FakeKms
) -> None:
    fake.fail_next(2, grpc.StatusCode.UNAVAILABLE, method="Encrypt")
    wrapped = await kms.wrap(DEK, aad=AAD)
    assert await kms.unwrap(wrapped, aad=AAD) == DEK
    assert fake.calls["Encrypt"] == 3
    assert kms.calls == 4


async def test_quota_exhausted_beyond_the_retry_budget_is_unavailable(
    kms: CloudKms, fake: FakeKms
) -> None:
    fake.fail_next(10, grpc.StatusCode.RESOURCE_EXHAUSTED)
    started = time.monotonic()
    with pytest.raises(KmsUnavailable, match="RESOURCE_EXHAUSTED after 4 attempts"):
        await kms.wrap(DEK, aad=AAD)
    assert time.monotonic() - started < 1.0
    assert kms.calls == fake.calls["Encrypt"] == FAST.max_attempts


async def test_a_slow_kms_hits_the_per_call_deadline_and_is_unavailable(fake: FakeKms) -> None:
    fake.latency = 5.0
    policy = replace(FAST, max_attempts=2, call_timeout=0.05)
    kms = await CloudKms.connect(KEY, endpoint=fake.address, retry=policy)
    started = time.monotonic()
    with pytest.raises(KmsUnavailable, match="DEADLINE_EXCEEDED after 2 attempts"):
        await kms.wrap(DEK, aad=AAD)
    assert time.monotonic() - started < 1.0
    await kms.close()


async def test_a_permanent_error_is_not_retried(kms: CloudKms, fake: FakeKms) -> None:
    fake.fail_next(1, grpc.StatusCode.PERMISSION_DENIED)
    with pytest.raises(KmsError, match="Encrypt failed: PERMISSION_DENIED") as caught:
        await kms.wrap(DEK, aad=AAD)
    assert not isinstance(caught.value, KmsUnavailable)
    assert kms.calls == 1


async def test_rotation_keeps_old_wraps_readable_and_new_wraps_use_the_new_version(
    kms: CloudKms, fake: FakeKms
) -> None:
    old = await kms.wrap(DEK, aad=AAD)
    new_version = await kms.rotate()
    assert new_version == f"{KEY}/cryptoKeyVersions/2" == fake.primary_of(KEY)
    assert await kms.primary_version() == new_version
    new = await kms.wrap(DEK, aad=AAD)
    assert new.key_version == new_version
    assert await kms.unwrap(old, aad=AAD) == DEK
    assert await kms.unwrap(new, aad=AAD) == DEK
    assert fake.calls["CreateCryptoKeyVersion"] == fake.calls["UpdateCryptoKeyPrimaryVersion"] == 1


async def test_rotation_waits_for_a_version_still_being_generated(
    kms: CloudKms, fake: FakeKms
) -> None:
    fake.pending_polls = 2
    assert await kms.rotate() == f"{KEY}/cryptoKeyVersions/2"
    assert fake.calls["GetCryptoKeyVersion"] == 2


async def test_a_disabled_version_refuses_to_unwrap(kms: CloudKms, fake: FakeKms) -> None:
    old = await kms.wrap(DEK, aad=AAD)
    await kms.rotate()
    await disable_through_the_api(fake, old.key_version)
    with pytest.raises(KmsError, match="Decrypt failed: FAILED_PRECONDITION"):
        await kms.unwrap(old, aad=AAD)


async def test_versions_list_every_version_with_create_time_state_and_primary(
    kms: CloudKms, fake: FakeKms
) -> None:
    first = fake.primary_of(KEY)
    made = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    fake.set_created(first, made)
    second = await kms.rotate()
    third = await kms.rotate()
    await disable_through_the_api(fake, first)
    fake.max_page_size = 2  # three versions: two pages
    calls_before = kms.calls

    versions = await kms.versions()

    assert [(v.name, v.state, v.primary) for v in versions] == [
        (first, "disabled", False),
        (second, "enabled", False),
        (third, "enabled", True),
    ]
    assert versions[0].created == made
    assert type(versions[0].created) is datetime.datetime
    assert versions[1].created > made
    assert versions[2].created.tzinfo is not None
    assert [r.page_token for r in fake.requests["ListCryptoKeyVersions"]] == ["", "2"]
    assert all(r.parent == KEY for r in fake.requests["ListCryptoKeyVersions"])
    # GetCryptoKey for the primary, then one call per page.
    assert kms.calls - calls_before == 3


async def test_a_version_list_naming_another_key_is_not_trusted(
    kms: CloudKms, fake: FakeKms
) -> None:
    fake.answer_key_name = OTHER_KEY
    with pytest.raises(KmsIntegrityError, match="names another key"):
        await kms.versions()


async def test_a_failing_version_list_is_retried_then_fails_with_the_status_only(
    kms: CloudKms, fake: FakeKms
) -> None:
    fake.fail_next(1, grpc.StatusCode.UNAVAILABLE, method="ListCryptoKeyVersions")
    assert len(await kms.versions()) == 1
    fake.fail_next(1, grpc.StatusCode.PERMISSION_DENIED, method="ListCryptoKeyVersions")
    with pytest.raises(KmsError, match="ListCryptoKeyVersions failed: PERMISSION_DENIED"):
        await kms.versions()


async def test_the_primary_version_is_cached_briefly(fake: FakeKms) -> None:
    cached = await CloudKms.connect(KEY, endpoint=fake.address, retry=FAST)
    uncached = await CloudKms.connect(KEY, endpoint=fake.address, retry=FAST, primary_ttl=0.0)
    for kms in (cached, cached, uncached, uncached):
        assert await kms.primary_version() == f"{KEY}/cryptoKeyVersions/1"
    assert (cached.calls, uncached.calls) == (1, 2)
    await cached.close()
    await uncached.close()


async def test_a_plaintext_channel_is_only_for_loopback() -> None:
    with pytest.raises(ValueError, match="only loopback"):
        await CloudKms.connect(KEY, endpoint="kms.example.com:443")


async def test_the_key_name_must_be_a_crypto_key() -> None:
    with pytest.raises(ValueError, match="key_name must be"):
        await CloudKms.connect(f"{KEY}/cryptoKeyVersions/1", endpoint="127.0.0.1:1")


# --- the same contract, whichever KMS -------------------------------------------------------


@pytest.fixture(params=["local", "gcp"])
async def provider(
    request: pytest.FixtureRequest, tmp_path: Path, fake: FakeKms
) -> AsyncIterator[KeyManagementService]:
    kms: KeyManagementService
    if request.param == "local":
        LocalKms.create_keyring(tmp_path / "keyring.json")
        kms = LocalKms.open(tmp_path / "keyring.json")
    else:
        kms = await CloudKms.connect(KEY, endpoint=fake.address, retry=FAST)
    yield kms
    await kms.close()


async def test_every_kms_round_trips_and_reports_the_primary_version(
    provider: KeyManagementService,
) -> None:
    wrapped = await provider.wrap(DEK, aad=AAD)
    assert wrapped.key_version == await provider.primary_version()
    assert await provider.unwrap(wrapped, aad=AAD) == DEK
    assert provider.calls >= 2


async def test_every_kms_binds_the_aad(provider: KeyManagementService) -> None:
    wrapped = await provider.wrap(DEK, aad=AAD)
    with pytest.raises(KmsError):
        await provider.unwrap(wrapped, aad=AAD + b"x")
    with pytest.raises(KmsError):
        await provider.unwrap(WrappedKey(wrapped.ciphertext[:-1], wrapped.key_version), aad=AAD)


async def test_every_kms_lists_its_versions_with_the_names_wraps_carry(
    provider: KeyManagementService,
) -> None:
    old = await provider.wrap(DEK, aad=AAD)
    rotated = await provider.rotate()
    versions = await provider.versions()
    assert [v.name for v in versions] == [old.key_version, rotated]
    assert [v.primary for v in versions] == [False, True]
    assert {v.state for v in versions} == {"enabled"}
    assert versions[0].created <= versions[1].created


async def test_every_kms_keeps_old_wraps_readable_after_rotation(
    provider: KeyManagementService,
) -> None:
    before = await provider.primary_version()
    old = await provider.wrap(DEK, aad=AAD)
    rotated = await provider.rotate()
    assert rotated != before
    assert await provider.primary_version() == rotated
    new = await provider.wrap(DEK, aad=AAD)
    assert (old.key_version, new.key_version) == (before, rotated)
    assert await provider.unwrap(old, aad=AAD) == DEK
    assert await provider.unwrap(new, aad=AAD) == DEK
