"""The development KMS: AES-256-GCM under versioned KEKs kept in a private keyring file."""

from __future__ import annotations

import datetime
import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from vault.kms.base import KmsError, WrappedKey
from vault.kms.local import LocalKms, default_keyring_path

ROOT = Path(__file__).resolve().parents[1]
DEK = bytes(range(32))
AAD = b"tok_123|mer_456|dek_1"


@pytest.fixture
def keyring(tmp_path: Path) -> Path:
    path = tmp_path / "data" / "tessera" / "local-kms-keyring.json"
    assert LocalKms.create_keyring(path)
    return path


@pytest.fixture
def kms(keyring: Path) -> LocalKms:
    return LocalKms.open(keyring)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 1]) + data[index + 1 :]


async def test_a_wrapped_key_unwraps_with_the_same_aad(kms: LocalKms) -> None:
    wrapped = await kms.wrap(DEK, aad=AAD)
    assert wrapped.key_version == "1"
    assert DEK not in wrapped.ciphertext
    assert len(wrapped.ciphertext) == 12 + len(DEK) + 16
    assert await kms.unwrap(wrapped, aad=AAD) == DEK


async def test_two_wraps_of_the_same_key_differ(kms: LocalKms) -> None:
    first, second = await kms.wrap(DEK, aad=AAD), await kms.wrap(DEK, aad=AAD)
    assert first.ciphertext[:12] != second.ciphertext[:12]


async def test_unwrapping_with_another_aad_fails(kms: LocalKms) -> None:
    wrapped = await kms.wrap(DEK, aad=AAD)
    with pytest.raises(KmsError, match="wrong aad or altered ciphertext"):
        await kms.unwrap(wrapped, aad=b"tok_999|mer_456|dek_1")


@pytest.mark.parametrize("index", [0, 11, 12, -1])
async def test_a_tampered_ciphertext_fails(kms: LocalKms, index: int) -> None:
    wrapped = await kms.wrap(DEK, aad=AAD)
    tampered = replace(wrapped, ciphertext=flip(wrapped.ciphertext, index))
    with pytest.raises(KmsError):
        await kms.unwrap(tampered, aad=AAD)


async def test_a_truncated_ciphertext_fails(kms: LocalKms) -> None:
    with pytest.raises(KmsError, match="too short"):
        await kms.unwrap(WrappedKey(ciphertext=b"\0" * 20, key_version="1"), aad=AAD)


async def test_an_unknown_version_fails(kms: LocalKms) -> None:
    wrapped = await kms.wrap(DEK, aad=AAD)
    with pytest.raises(KmsError, match="unknown key version"):
        await kms.unwrap(replace(wrapped, key_version="7"), aad=AAD)


async def test_rotation_makes_a_new_primary_and_old_wraps_still_unwrap(kms: LocalKms) -> None:
    old = await kms.wrap(DEK, aad=AAD)
    assert await kms.rotate() == "2"
    assert await kms.primary_version() == "2"
    new = await kms.wrap(DEK, aad=AAD)
    assert new.key_version == "2"
    assert await kms.unwrap(old, aad=AAD) == DEK
    assert await kms.unwrap(new, aad=AAD) == DEK
    # The version decides the key: an old wrap presented as version 2 does not decrypt.
    with pytest.raises(KmsError):
        await kms.unwrap(replace(old, key_version="2"), aad=AAD)


async def test_a_rotation_survives_reopening_the_keyring(kms: LocalKms, keyring: Path) -> None:
    old = await kms.wrap(DEK, aad=AAD)
    await kms.rotate()
    reopened = LocalKms.open(keyring)
    assert await reopened.primary_version() == "2"
    assert await reopened.unwrap(old, aad=AAD) == DEK


async def test_a_rotation_by_another_process_is_seen(kms: LocalKms, keyring: Path) -> None:
    cli = LocalKms.open(keyring)
    assert await cli.rotate() == "2"
    assert (await kms.wrap(DEK, aad=AAD)).key_version == "2"
    # And the next rotation numbers after it instead of overwriting version 2.
    assert await kms.rotate() == "3"
    assert await cli.unwrap(await kms.wrap(DEK, aad=AAD), aad=AAD) == DEK


async def test_a_disabled_version_refuses_to_unwrap(kms: LocalKms) -> None:
    old = await kms.wrap(DEK, aad=AAD)
    await kms.rotate()
    await kms.disable_version("1")
    with pytest.raises(KmsError, match="disabled"):
        await kms.unwrap(old, aad=AAD)


async def test_the_primary_version_cannot_be_disabled(kms: LocalKms) -> None:
    with pytest.raises(KmsError, match="primary"):
        await kms.disable_version("1")


async def test_calls_count_wraps_unwraps_and_rotations(kms: LocalKms) -> None:
    wrapped = await kms.wrap(DEK, aad=AAD)
    await kms.unwrap(wrapped, aad=AAD)
    await kms.rotate()
    await kms.primary_version()
    assert kms.calls == 3


def test_the_keyring_is_private_to_its_user(keyring: Path, tmp_path: Path) -> None:
    assert mode(keyring) == 0o600
    assert mode(keyring.parent) == 0o700
    assert mode(keyring.parent.parent) == 0o700
    document = json.loads(keyring.read_text())
    assert document["primary"] == "1"
    assert list(document["versions"]) == ["1"]


async def test_rotation_rewrites_the_keyring_privately_and_atomically(
    kms: LocalKms, keyring: Path
) -> None:
    await kms.rotate()
    assert mode(keyring) == 0o600
    leftovers = {p.name for p in keyring.parent.iterdir()} - {keyring.name, keyring.name + ".lock"}
    assert leftovers == set()


def test_creating_the_keyring_again_never_overwrites_it(keyring: Path) -> None:
    before = keyring.read_bytes()
    assert not LocalKms.create_keyring(keyring)
    assert keyring.read_bytes() == before


def test_a_missing_keyring_says_to_run_the_set_up(tmp_path: Path) -> None:
    with pytest.raises(KmsError, match=r"no local KMS keyring at .*run the set-up"):
        LocalKms.open(tmp_path / "absent.json")


def test_a_malformed_keyring_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    path.write_text('{"format": "tessera-local-kms/1", "primary": "1", "versions": {}}')
    with pytest.raises(KmsError, match="malformed"):
        LocalKms.open(path)


def test_a_keyring_inside_the_repository_is_refused() -> None:
    path = ROOT / "vault" / "kms" / "keyring.json"
    with pytest.raises(KmsError, match="inside the repository"):
        LocalKms.create_keyring(path)
    assert not path.exists()


def test_the_default_keyring_lives_in_the_user_data_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_keyring_path() == tmp_path / "tessera" / "local-kms-keyring.json"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/is/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = tmp_path / "home" / ".local" / "share" / "tessera" / "local-kms-keyring.json"
    assert default_keyring_path() == expected
    assert not default_keyring_path().is_relative_to(ROOT)


async def test_a_keyring_path_may_be_given_as_a_string(keyring: Path) -> None:
    kms = LocalKms.open(str(keyring))
    assert kms.path == keyring
    assert not LocalKms.create_keyring(str(keyring))


# --- the versions (the key inventory) --------------------------------------------------------


async def test_versions_list_each_with_its_creation_time_state_and_primary(
    kms: LocalKms, keyring: Path
) -> None:
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    await kms.rotate()
    await kms.rotate()
    await kms.disable_version("1")
    after = datetime.datetime.now(datetime.UTC)

    versions = await LocalKms.open(keyring).versions()

    assert [(v.name, v.state, v.primary) for v in versions] == [
        ("1", "disabled", False),
        ("2", "enabled", False),
        ("3", "enabled", True),
    ]
    assert all(v.created.tzinfo is not None for v in versions)
    assert versions[0].created <= versions[1].created <= versions[2].created
    assert before - datetime.timedelta(seconds=5) <= versions[0].created
    assert versions[2].created <= after
    recorded = json.loads(keyring.read_text())["created"]
    assert set(recorded) == {"1", "2", "3"}
    assert recorded["3"] == versions[2].created.isoformat().replace("+00:00", "Z")


async def test_a_keyring_written_before_creation_times_loads_and_keeps_a_stable_time(
    tmp_path: Path,
) -> None:
    """An old keyring (no "created") is dated by its file's modification time, and the first
    rewrite records that time, so it does not move on to the rewrite's own time."""
    path = tmp_path / "old-keyring.json"
    assert LocalKms.create_keyring(path)
    document = json.loads(path.read_text())
    del document["created"]
    path.write_text(json.dumps(document))
    written = datetime.datetime(2024, 3, 1, 12, 0, tzinfo=datetime.UTC)
    os.utime(path, (written.timestamp(), written.timestamp()))

    kms = LocalKms.open(path)
    wrapped = await kms.wrap(DEK, aad=AAD)
    [only] = await kms.versions()
    assert (only.name, only.created, only.state, only.primary) == ("1", written, "enabled", True)

    await kms.rotate()
    first, second = await LocalKms.open(path).versions()
    assert first.created == written
    assert second.created > written
    assert json.loads(path.read_text())["created"]["1"] == "2024-03-01T12:00:00Z"
    assert await kms.unwrap(wrapped, aad=AAD) == DEK


def test_a_creation_time_without_a_zone_or_for_an_unknown_version_is_refused(
    keyring: Path,
) -> None:
    document = json.loads(keyring.read_text())
    for created in ({"1": "2024-03-01T12:00:00"}, {"7": "2024-03-01T12:00:00Z"}, ["x"]):
        keyring.write_text(json.dumps({**document, "created": created}))
        with pytest.raises(KmsError, match="malformed"):
            LocalKms.open(keyring)
