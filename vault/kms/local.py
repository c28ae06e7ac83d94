"""A development KMS: KEK versions in a keyring file on the developer's machine.

It lets the vault run with no cloud account, with the same semantics as Cloud KMS (versions,
a primary, disabled versions, AAD binding), so code written against it behaves the same in
production. It is not a KMS: the KEKs sit in a plain file readable by the user.

- The keyring lives outside the repository on purpose (`default_keyring_path()`, under
  `$XDG_DATA_HOME`), so keys can never be committed; this module refuses to read or write a
  keyring inside the source tree.
- In production mode the vault refuses the local KMS: `VaultSettings.production_problems()`
  reports `TESSERA_VAULT_KMS_PROVIDER=local`, so production needs Cloud KMS (`vault.kms.gcp`).
- Writes are atomic (temporary file + `os.replace`, mode 0600) and serialised with a lock file,
  so a rotation from a CLI and a running vault cannot overwrite each other's new version.
- Each version's creation time is kept in `"created"` (ISO 8601, UTC), for the key inventory.
  Keyrings written before it existed still load (the format name is unchanged; older code
  ignores the member): a version without a recorded time is given the keyring file's last
  modification time, and the next write (rotation, disable) records that value for good. It is
  exact for a keyring never rotated; for older versions of a keyring rotated before, it is the
  time of the last change, so their age is understated. New versions always record their own.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import fcntl
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vault.kms.base import KekVersion, KmsError, WrappedKey

__all__ = ["LocalKms", "default_keyring_path"]

_FORMAT = "tessera-local-kms/1"
_KEY_BYTES = 32
_NONCE_BYTES = 12
_TAG_BYTES = 16
_FILE_MODE = 0o600
_DIR_MODE = 0o700


def default_keyring_path() -> Path:
    """`$XDG_DATA_HOME/tessera/local-kms-keyring.json` (or `~/.local/share/...`): never the repo."""
    data_home = os.environ.get("XDG_DATA_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    base = Path(data_home) if os.path.isabs(data_home) else Path.home() / ".local" / "share"
    return base / "tessera" / "local-kms-keyring.json"


def _source_tree() -> Path | None:
    """The repository this module runs from, if it runs from a checkout (not an installed wheel)."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "vault").is_dir():
        return root
    return None


def _refuse_inside_source_tree(path: Path) -> None:
    root = _source_tree()
    if root is not None and path.resolve().is_relative_to(root):
        raise KmsError(
            f"refusing a local KMS keyring inside the repository ({path}): keys must never be "
            f"committed; use the default path {default_keyring_path()}"
        )


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


@dataclass
class _Keyring:
    primary: str
    versions: dict[str, bytes]
    disabled: set[str] = field(default_factory=set)
    #: When each version was made (every version has one once loaded).
    created: dict[str, datetime.datetime] = field(default_factory=dict)

    def to_json(self) -> str:
        document = {
            "format": _FORMAT,
            "primary": self.primary,
            "versions": {v: base64.b64encode(k).decode("ascii") for v, k in self.versions.items()},
            "disabled": sorted(self.disabled, key=int),
            "created": {
                v: self.created[v].astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")
                for v in self.versions
            },
        }
        return json.dumps(document, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, path: Path, modified: datetime.datetime) -> _Keyring:
        """`modified` (the file's modification time) stands in for creation times not recorded."""

        def malformed(why: str) -> KmsError:
            return KmsError(f"local KMS keyring {path} is malformed: {why}")

        try:
            document: Any = json.loads(text)
        except ValueError:
            raise malformed("not JSON") from None
        if not isinstance(document, dict) or document.get("format") != _FORMAT:
            raise malformed(f"expected format {_FORMAT!r}")
        primary, raw_versions, disabled = (
            document.get("primary"),
            document.get("versions"),
            document.get("disabled", []),
        )
        if not isinstance(raw_versions, dict) or not raw_versions:
            raise malformed("no versions")
        versions: dict[str, bytes] = {}
        for version, encoded in raw_versions.items():
            if not version.isdigit() or not isinstance(encoded, str):
                raise malformed(f"bad version entry {version!r}")
            try:
                key = base64.b64decode(encoded, validate=True)
            except binascii.Error:
                raise malformed(f"version {version} is not base64") from None
            if len(key) != _KEY_BYTES:
                raise malformed(f"version {version} is not a {_KEY_BYTES}-byte key")
            versions[version] = key
        if primary not in versions:
            raise malformed("the primary version is missing")
        if not isinstance(disabled, list) or not set(disabled) <= set(versions):
            raise malformed("disabled names an unknown version")
        if primary in disabled:
            raise malformed("the primary version is disabled")
        raw_created = document.get("created", {})
        if not isinstance(raw_created, dict) or not set(raw_created) <= set(versions):
            raise malformed("created names an unknown version")
        created = dict.fromkeys(versions, modified)
        for version, stamp in raw_created.items():
            try:
                when = datetime.datetime.fromisoformat(stamp) if isinstance(stamp, str) else None
            except ValueError:
                when = None
            if when is None or when.tzinfo is None:
                raise malformed(f"version {version}'s creation time is not an ISO time with zone")
            created[version] = when
        return cls(primary=primary, versions=versions, disabled=set(disabled), created=created)


def _write_temp(path: Path, text: str) -> Path:
    """A complete, synced, mode-0600 copy of `text` next to `path`, ready to be swapped in."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, _FILE_MODE)  # whatever the umask did
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def _write_atomically(path: Path, text: str) -> None:
    """Write a whole new file and swap it in, so a crash never leaves half a keyring."""
    tmp = _write_temp(path, text)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on a sidecar file (the keyring itself is replaced, so not lockable)."""
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, _FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _make_private_dirs(directory: Path) -> None:
    """Create missing parents with mode 0700 (`mkdir(parents=True)` ignores `mode` for parents)."""
    missing = []
    for candidate in (directory, *directory.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    for candidate in reversed(missing):
        with contextlib.suppress(FileExistsError):
            candidate.mkdir(mode=_DIR_MODE)
            os.chmod(candidate, _DIR_MODE)


class LocalKms:
    """`KeyManagementService` backed by a keyring file; for development and tests only."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        """Same as `LocalKms.open(path)`."""
        self._path = Path(path) if path else default_keyring_path()
        _refuse_inside_source_tree(self._path)
        self._calls = 0
        self._stamp: tuple[int, int, int] | None = None
        self._keyring = self._current()

    @staticmethod
    def create_keyring(path: str | os.PathLike[str] | None = None) -> bool:
        """Create a keyring with version "1" unless one exists; never overwrites. True if created.

        Idempotent so the set-up can run it every time without destroying existing keys (which
        would make every card wrapped under them unreadable).
        """
        path = Path(path) if path else default_keyring_path()
        _refuse_inside_source_tree(path)
        if path.exists():
            return False
        _make_private_dirs(path.parent)
        keyring = _Keyring(
            primary="1",
            versions={"1": AESGCM.generate_key(bit_length=256)},
            created={"1": _utc_now()},
        )
        tmp = _write_temp(path, keyring.to_json())
        try:
            # link() fails if the path appeared meanwhile: a concurrent set-up is never clobbered.
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True

    @classmethod
    def open(cls, path: str | os.PathLike[str] | None = None) -> LocalKms:
        """Load an existing keyring (never creates one: a missing keyring is a set-up step).

        `None` or "" means `default_keyring_path()`.
        """
        return cls(path)

    def _current(self) -> _Keyring:
        """The keyring as the file has it now, re-read only when the file was replaced.

        Another process (a CLI rotation or disable) may have changed it; `os.replace` gives the
        file a new inode, so a `stat` per call is enough to notice.
        """
        try:
            stat = os.stat(self._path)
        except FileNotFoundError:
            raise KmsError(
                f"no local KMS keyring at {self._path}: run the set-up (`make setup`) to create "
                "one (it calls LocalKms.create_keyring)"
            ) from None
        stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            modified = datetime.datetime.fromtimestamp(stat.st_mtime, datetime.UTC)
            text = self._path.read_text(encoding="utf-8")
            self._keyring = _Keyring.from_json(text, self._path, modified.replace(microsecond=0))
            self._stamp = stamp
        return self._keyring

    @property
    def path(self) -> Path:
        return self._path

    @property
    def calls(self) -> int:
        """wrap, unwrap and rotate calls made (the local stand-in for KMS requests)."""
        return self._calls

    async def wrap(self, plaintext: bytes, *, aad: bytes) -> WrappedKey:
        """AES-256-GCM under the primary version; ciphertext = nonce || ct || tag."""
        self._calls += 1
        keyring = self._current()
        version = keyring.primary
        nonce = os.urandom(_NONCE_BYTES)
        sealed = AESGCM(keyring.versions[version]).encrypt(nonce, plaintext, aad)
        return WrappedKey(ciphertext=nonce + sealed, key_version=version)

    async def unwrap(self, wrapped: WrappedKey, *, aad: bytes) -> bytes:
        self._calls += 1
        keyring = self._current()
        version = wrapped.key_version
        key = keyring.versions.get(version)
        if key is None:
            raise KmsError(f"local KMS: unknown key version {version!r}")
        if version in keyring.disabled:
            raise KmsError(f"local KMS: key version {version} is disabled")
        if len(wrapped.ciphertext) < _NONCE_BYTES + _TAG_BYTES:
            raise KmsError("local KMS: ciphertext is too short")
        nonce, sealed = wrapped.ciphertext[:_NONCE_BYTES], wrapped.ciphertext[_NONCE_BYTES:]
        try:
            return AESGCM(key).decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise KmsError(
                "local KMS: decryption failed (wrong aad or altered ciphertext)"
            ) from None

    async def primary_version(self) -> str:
        return self._current().primary

    async def rotate(self) -> str:
        """Add version N+1 and make it primary; older versions keep decrypting."""
        self._calls += 1
        with _locked(self._path):
            current = self._current()  # the file, not an old copy, is the truth
            version = str(max(int(v) for v in current.versions) + 1)
            # A new object: if the write fails, nothing may wrap under a key that is not on disk.
            keyring = _Keyring(
                primary=version,
                versions={**current.versions, version: AESGCM.generate_key(bit_length=256)},
                disabled=set(current.disabled),
                created={**current.created, version: _utc_now()},
            )
            _write_atomically(self._path, keyring.to_json())
        return version

    async def versions(self) -> list[KekVersion]:
        """Every version in the keyring, oldest first (no call counted: nothing is decrypted)."""
        keyring = self._current()
        return [
            KekVersion(
                name=version,
                created=keyring.created[version],
                state="disabled" if version in keyring.disabled else "enabled",
                primary=version == keyring.primary,
            )
            for version in sorted(keyring.versions, key=int)
        ]

    async def disable_version(self, version: str) -> None:
        """Stop a version from unwrapping (after its data keys were rewrapped). Not the primary."""
        with _locked(self._path):
            current = self._current()
            if version not in current.versions:
                raise KmsError(f"local KMS: unknown key version {version!r}")
            if version == current.primary:
                raise KmsError(f"local KMS: refusing to disable the primary version {version}")
            keyring = _Keyring(
                current.primary, current.versions, current.disabled | {version}, current.created
            )
            _write_atomically(self._path, keyring.to_json())

    async def close(self) -> None:
        """Nothing to release; here for the protocol."""
