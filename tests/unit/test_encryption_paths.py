"""The encryption layer's fast paths (in-memory sealing, sealing through a file, opening a download in
place, ranged reads) all write and read the one format v1, checked against an independent reader and
writer built from docs/encryption.md."""

from __future__ import annotations

import os
import random

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dbops.errors import DamagedObjectError, StorageError
from dbops.storage import crypt, keys
from dbops.storage.crypt import EncryptedStore
from dbops.storage.cryptformat import BATCH, HEADER, SEGMENT, TAG, sealed_size
from dbops.storage.local import LocalStore

SIZES = (0, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, BATCH * SEGMENT, BATCH * SEGMENT + 1, 3 * BATCH * SEGMENT + 7)


def ring(k: bytes) -> keys.Keyring:
    return keys.Keyring(current=k, by_id={keys.key_id(k): k})


@pytest.fixture
def raw(tmp_path):
    return LocalStore(tmp_path / "s")


def _ref_key(master: bytes, salt: bytes) -> AESGCM:
    return AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"dbops object key v1").derive(master))


def _nonce(i: int, last: bool) -> bytes:
    return i.to_bytes(11, "big") + bytes([1 if last else 0])


def ref_open(master: bytes, name: bytes, stored: bytes) -> bytes:
    """docs/encryption.md's format v1, read segment by segment with AESGCM.decrypt."""
    head = stored[:HEADER]
    assert head[:8] == b"DBOPSENC" and head[8:12] == bytes([1, 1, 16, 0]) and head[52:56] == bytes(4)
    assert head[12:20].hex() == keys.key_id(master)
    aes, aad, body = _ref_key(master, head[20:52]), head + name, stored[HEADER:]
    step = SEGMENT + TAG
    n = max(1, -(-len(body) // step))
    return b"".join(aes.decrypt(_nonce(i, i == n - 1), body[i * step:(i + 1) * step], aad) for i in range(n))


def ref_seal(master: bytes, name: bytes, data: bytes) -> bytes:
    """docs/encryption.md's format v1, written segment by segment with AESGCM.encrypt (as dbops did first)."""
    salt = os.urandom(32)
    head = b"DBOPSENC" + bytes([1, 1, 16, 0]) + bytes.fromhex(keys.key_id(master)) + salt + bytes(4)
    aes = _ref_key(master, salt)
    n = max(1, -(-len(data) // SEGMENT))
    return head + b"".join(aes.encrypt(_nonce(i, i == n - 1), data[i * SEGMENT:(i + 1) * SEGMENT], head + name)
                           for i in range(n))


def test_memory_and_file_sealing_write_the_same_bytes(raw, tmp_path, monkeypatch):
    k = os.urandom(32)
    in_memory = EncryptedStore(raw, ring(k), "pre")
    through_file = EncryptedStore(raw, ring(k), "pre", memory_limit=0)
    monkeypatch.setattr(crypt.os, "urandom", lambda n: b"\x07" * n)  # one salt, to compare the bytes
    rnd = random.Random(7)
    for n in SIZES:
        data = rnd.randbytes(n)
        src = tmp_path / "src"
        src.write_bytes(data)
        stored = []
        for put in (lambda: in_memory.put_file("pre/a", str(src), metadata={"m": "1"}),
                    lambda: through_file.put_file("pre/a", str(src), metadata={"m": "1"}),
                    lambda: in_memory.put("pre/a", data, metadata={"m": "1"})):
            assert put()
            stored.append(raw.get("pre/a"))
            assert raw.head("pre/a").metadata == {"m": "1", "enc-key-id": keys.key_id(k)}
        assert len(stored[0]) == sealed_size(n) and stored[1] == stored[0] == stored[2]  # one format
        assert ref_open(k, b"a", stored[0]) == data  # the object name (under the prefix) is authenticated
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".sealed-")]


def test_objects_written_segment_by_segment_are_read_by_every_path(raw, tmp_path):
    """Objects sealed the way the first version did (per-segment encrypt and join) stay readable."""
    k = os.urandom(32)
    s = EncryptedStore(raw, ring(k))
    rnd = random.Random(11)
    for n in SIZES:
        data = rnd.randbytes(n)
        raw.put("o", ref_seal(k, b"o", data))
        assert s.get("o") == data
        info = s.get_to_file("o", str(tmp_path / "out"))
        assert (tmp_path / "out").read_bytes() == data and info.size == n
        s.put("p", data)
        assert ref_open(k, b"p", raw.get("p")) == data


def test_ranges_across_segment_and_batch_boundaries(raw):
    k = os.urandom(32)
    s = EncryptedStore(raw, ring(k))
    n = 3 * BATCH * SEGMENT + 7
    data = random.Random(3).randbytes(n)
    s.put("o", data)
    edges = [0, 1, SEGMENT - 1, SEGMENT, BATCH * SEGMENT - 3, BATCH * SEGMENT, n - SEGMENT - 1, n - 8, n - 1]
    for a in edges:
        for ln in (1, 2, 16, SEGMENT, SEGMENT + 2, 2 * BATCH * SEGMENT, n):
            assert s.get_range("o", a, ln) == data[a:a + ln], (a, ln)
    assert s.get_range("o", n, 10) == b""  # past the end: nothing, as from a plain object


def test_download_opened_in_place_detects_damage_in_a_later_batch(raw, tmp_path):
    k = os.urandom(32)
    s = EncryptedStore(raw, ring(k))
    data = os.urandom(2 * BATCH * SEGMENT + 100)
    s.put("o", data)
    stored = bytearray(raw.get("o"))
    stored[HEADER + (BATCH + 3) * (SEGMENT + TAG) + 9] ^= 0x40  # in the second batch
    raw.put("o", bytes(stored))
    with pytest.raises(DamagedObjectError) as ei:
        s.get_to_file("o", str(tmp_path / "out"))
    assert f"segment {BATCH + 3}" in ei.value.message
    raw.put("o", bytes(stored[:HEADER + 2 * (SEGMENT + TAG) + 5]))  # cut inside a tag
    with pytest.raises(DamagedObjectError):
        s.get_to_file("o", str(tmp_path / "out"))


def test_a_file_that_changes_size_while_sealed_is_refused(raw, tmp_path):
    s = EncryptedStore(raw, ring(os.urandom(32)))
    src = tmp_path / "f"
    src.write_bytes(b"x" * (SEGMENT + 5))
    with open(src, "rb") as f, pytest.raises(StorageError, match="changed while"):
        s.seal_file("o", f, size=SEGMENT + 6)
    with open(src, "rb") as f, pytest.raises(StorageError, match="changed while"):
        s.seal_file("o", f, size=SEGMENT)
