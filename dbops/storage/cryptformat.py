"""The encrypted object format v1 (see :mod:`dbops.storage.crypt` and docs/encryption.md): its
constants and header, the nonce of a segment, the per-object key, and segments sealed and opened
in place."""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dbops.errors import DamagedObjectError

MAGIC = b"DBOPSENC"
VERSION = 1
ALGORITHM = 1  # AES-256-GCM, per-object key from HKDF-SHA256, 64 KiB segments
SHIFT = 16
SEGMENT = 1 << SHIFT
TAG = 16
HEADER = 56
_INFO = b"dbops object key v1"
STEP = SEGMENT + TAG  # one sealed segment
BATCH = 16  # segments read, sealed or opened per file read (1 MiB of plaintext)
MEMORY_LIMIT = 80 * 1024 * 1024  # put_file seals up to this many bytes in memory (a default pack and a frame)
META_KEY_ID = "enc-key-id"  # object metadata: which key sealed it (not secret)


def is_encrypted(data: bytes) -> bool:
    return data[:len(MAGIC)] == MAGIC


def header_key_id(data: bytes) -> str | None:
    """The key ID in an object's first bytes, or None for a plain object."""
    if not is_encrypted(data) or len(data) < HEADER:
        return None
    return data[12:20].hex()


def _nonce(i: int, last: bool) -> bytes:
    return i.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def object_key(master: bytes, salt: bytes) -> AESGCM:
    return AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_INFO).derive(master))


def sealed_size(n: int) -> int:
    """The stored size of an n-byte plaintext: header, the plaintext, a tag per segment (at least one)."""
    return HEADER + n + max(1, -(-n // SEGMENT)) * TAG


def seal_into(aes: AESGCM, aad: bytes, plain: memoryview, out: memoryview, first: int, total: int) -> int:
    """Seal plain (whole segments from segment `first` on; the object has `total` segments) into out;
    returns the bytes written."""
    w = 0
    for j in range(max(1, -(-len(plain) // SEGMENT))):
        piece = plain[j * SEGMENT:(j + 1) * SEGMENT]
        i = first + j
        aes.encrypt_into(_nonce(i, i == total - 1), piece, aad, out[w:w + len(piece) + TAG])
        w += len(piece) + TAG
    return w


class OpenedObject:
    """An encrypted object's header, checked, with its per-object cipher."""

    __slots__ = ("aes", "aad")

    def __init__(self, aes: AESGCM, aad: bytes):
        self.aes, self.aad = aes, aad

    def segment_into(self, i: int, ct: bytes | memoryview, out: bytearray | memoryview, key: str, *,
                     last: bool | None) -> int:
        """Open segment i into out's first len(ct) - TAG bytes; returns that length.
        last=None: either (for ranged reads, which cannot know)."""
        if len(ct) < TAG:
            raise DamagedObjectError(f"object {key} is truncated (segment {i} has {len(ct)} bytes)")
        for flag in ((False, True) if last is None else (last,)):
            try:
                self.aes.decrypt_into(_nonce(i, flag), ct, self.aad, memoryview(out)[:len(ct) - TAG])
                return len(ct) - TAG
            except InvalidTag:
                continue
        raise DamagedObjectError(
            f"object {key} fails its authentication check (segment {i}): tampered with or damaged in storage",
            hint="its content cannot be trusted; `dbops verify` lists what it affects, a new backup replaces it",
        )
