"""Encryption keys: parsing, key IDs, loading from settings, generating.

No ``cryptography`` import here: configuration parsing (also on the wal-push fast path) uses
:func:`key_problem`. A key is 32 random bytes written in base64; its key ID is the first 8 bytes
of SHA-256 over a fixed label and the key, in hex. The ID names a key in messages and object
headers; it reveals nothing usable about the key (SHA-256 is one-way over 256 random bits).
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dbops import secrets
from dbops.errors import ConfigError

if TYPE_CHECKING:
    from dbops.config import EncryptionSettings

KEY_BYTES = 32
_ID_LABEL = b"dbops key id v1\x00"


def decode_key(text: str) -> bytes | None:
    """The 32 key bytes, or None when text is not base64 of exactly 32 bytes."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == KEY_BYTES else None


def key_problem(text: str) -> str | None:
    """Why text is not a usable key (never quoting it), or None."""
    if decode_key(text) is None:
        return "expected 32 random bytes in base64 (44 characters; `dbops key generate` makes one)"
    return None


def key_id(key: bytes) -> str:
    import hashlib

    return hashlib.sha256(_ID_LABEL + key).digest()[:8].hex()


def generate() -> str:
    """A new key, base64."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()


@dataclass(frozen=True)
class Keyring:
    """The keys one process may use. ``current`` encrypts new objects; every key decrypts."""

    current: bytes | None = None
    by_id: dict[str, bytes] = field(default_factory=dict, repr=False)
    allow_plaintext: bool = False

    def __repr__(self) -> str:  # never the key bytes, not even in a traceback's locals
        return f"Keyring(current={self.current_id}, keys={sorted(self.by_id)}, allow_plaintext={self.allow_plaintext})"

    @property
    def current_id(self) -> str | None:
        return key_id(self.current) if self.current else None

    @property
    def ids(self) -> list[str]:
        """Every key ID, the current one first."""
        cur = self.current_id
        return ([cur] if cur else []) + sorted(i for i in self.by_id if i != cur)


def read_key_file(path: str, where: str) -> bytes:
    try:
        st = os.stat(path)
        with open(path, "r") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{where}: key file {path} does not exist",
                          hint="`dbops key generate --out FILE` writes a new key file (mode 0600)") from None
    except OSError as e:
        raise ConfigError(f"{where}: cannot read key file {path}: {e.strerror}",
                          hint="the user running dbops (for archive_command: postgres) must be able to read it") from None
    if st.st_mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ConfigError(f"{where}: key file {path} is readable or writable by every user",
                          hint=f"chmod 600 {path} (or 640 with a group that only dbops users are in)")
    secrets.register(text.strip())
    key = decode_key(text)
    if key is None:
        raise ConfigError(f"{where}: key file {path} does not hold a key", detail=key_problem(text))
    return key


def load(settings: "EncryptionSettings") -> Keyring:
    """Read every configured key (files now, not at parse time)."""
    current = None
    if settings.key:
        current = decode_key(settings.key)
    elif settings.key_file:
        current = read_key_file(settings.key_file, "storage.encryption.key_file")
    older = [decode_key(k) for k in settings.old_keys]
    older += [read_key_file(p, f"storage.encryption.old_key_files[{i}]") for i, p in enumerate(settings.old_key_files)]
    by_id = {key_id(k): k for k in older if k is not None}
    if current is not None:
        by_id[key_id(current)] = current
    return Keyring(current=current, by_id=by_id, allow_plaintext=settings.allow_plaintext)
