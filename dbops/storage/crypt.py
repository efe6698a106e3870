"""Client-side encryption of every object, as a layer around any ObjectStore.

Object format v1 (see docs/encryption.md for the argument)::

    header (56 bytes): b"DBOPSENC" | version 1 | algorithm 1 | segment shift 16 | 0 |
                       key ID (8 bytes) | salt (32 random bytes) | 4 zero bytes
    then the plaintext in segments of 64 KiB, each sealed with AES-256-GCM (ciphertext + 16-byte tag)

* every object gets its own AES-256 key: HKDF-SHA256(master key, salt, info) with a fresh random
  256-bit salt, so no two objects share a key (a collision needs ~2^128 objects);
* under that per-object key the nonce of segment i is i (88 bits, big-endian) followed by a
  byte that is 1 for the last segment and 0 otherwise: nonces never repeat within an object,
  and a truncated or extended object fails (STREAM construction);
* every segment authenticates the header and the object's name (relative to storage.prefix) as
  associated data: an object moved to another name, or given another header, fails to open.

Ranged reads stay possible: plaintext offset o lies in segment o // 64 KiB, whose ciphertext sits
at a fixed position; the layer reads the header once per object (cached) and then exactly the
segments covering the range. Object names, sizes and the metadata dbops lists by stay plain.

Speed: segments are sealed and opened straight into one preallocated buffer (``encrypt_into`` /
``decrypt_into``: no per-segment allocation, no join); a file up to ``memory_limit`` bytes is sealed
in memory and sent as one body (no sealed copy on disk); a larger one is sealed through a
temporary file in 1 MiB steps, so memory stays bounded whatever the object size. Downloads are
opened in place in the file they were downloaded to (a plaintext segment never lies after its
ciphertext), again 1 MiB at a time.

The format's constants, its nonces, per-object keys, sealing and opening of segments:
:mod:`dbops.storage.cryptformat`; ranged reads as streams: :mod:`dbops.storage.cryptrange`.
"""

from __future__ import annotations

import os
import tempfile
import threading
from typing import BinaryIO, Iterable, Iterator

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dbops.errors import DamagedObjectError, EncryptionError, NotFoundError, StorageError
from dbops.storage.base import BytesRange, ObjectInfo, ObjectStore, RangeReader
from dbops.storage.cryptformat import (ALGORITHM, BATCH, HEADER, MAGIC, MEMORY_LIMIT, META_KEY_ID, SEGMENT, SHIFT, STEP,
                                       TAG, VERSION, OpenedObject, header_key_id, is_encrypted, object_key,
                                       seal_into, sealed_size)
from dbops.storage.keys import Keyring

class EncryptedStore:
    """Wraps an ObjectStore: seals what is written, opens what is read (see the module doc)."""

    def __init__(self, inner: ObjectStore, keyring: Keyring, prefix: str = "", *, memory_limit: int = MEMORY_LIMIT):
        self.inner = inner
        self.keys = keyring
        self.prefix = prefix.strip("/")
        self.memory_limit = memory_limit  # put_file: larger files are sealed through a temporary file
        self._headers: dict[str, OpenedObject | None] = {}  # ranged reads: key -> opened header (None: plain)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ format

    def _name(self, key: str) -> bytes:
        p = self.prefix + "/"
        return (key[len(p):] if self.prefix and key.startswith(p) else key).encode()

    def _sealer(self, key: str) -> tuple[bytes, AESGCM, bytes]:
        """(header, the object's cipher, associated data) for a new object: a fresh salt, so a fresh key."""
        master = self.keys.current
        assert master is not None
        salt = os.urandom(32)
        header = (MAGIC + bytes([VERSION, ALGORITHM, SHIFT, 0]) + bytes.fromhex(self.keys.current_id or "")
                  + salt + bytes(4))
        return header, object_key(master, salt), header + self._name(key)

    def seal(self, key: str, data: bytes | memoryview) -> bytearray:
        """The stored form of data: header and sealed segments, built in one buffer."""
        header, aes, aad = self._sealer(key)
        mv = memoryview(data)
        out = bytearray(sealed_size(len(mv)))
        out[:HEADER] = header
        seal_into(aes, aad, mv, memoryview(out)[HEADER:], 0, max(1, -(-len(mv) // SEGMENT)))
        return out

    def seal_file(self, key: str, src: BinaryIO, dst: BinaryIO | None = None, *, size: int) -> bytearray | None:
        """seal() of the size bytes in src: into memory (dst None: returned), or into dst 1 MiB at a
        time; the same format either way. StorageError when src does not hold exactly size bytes."""
        header, aes, aad = self._sealer(key)
        total = max(1, -(-size // SEGMENT))
        if dst is None:
            out = bytearray(sealed_size(size))
            out[:HEADER] = header
            omv = memoryview(out)[HEADER:]
        else:
            dst.write(header)
            out, buf = None, bytearray(BATCH * STEP)
        plain = bytearray(BATCH * SEGMENT)
        pmv, w, i = memoryview(plain), 0, 0
        while i < total:
            want = min(BATCH * SEGMENT, size - i * SEGMENT)
            n = 0
            while n < want and (got := src.readinto(pmv[n:want])):
                n += got
            if n != want:
                raise StorageError(f"{getattr(src, 'name', 'the file')} changed while it was being encrypted")
            if dst is None:
                w += seal_into(aes, aad, pmv[:n], omv[w:], i, total)
            else:
                dst.write(memoryview(buf)[:seal_into(aes, aad, pmv[:n], memoryview(buf), i, total)])
            i += max(1, -(-n // SEGMENT))
        if src.read(1):
            raise StorageError(f"{getattr(src, 'name', 'the file')} changed while it was being encrypted")
        return out

    def _open_header(self, key: str, head: bytes) -> OpenedObject:
        if len(head) < HEADER:
            raise DamagedObjectError(f"object {key} is truncated inside its encryption header")
        if head[8] != VERSION or head[9] != ALGORITHM or head[10] != SHIFT:
            raise DamagedObjectError(
                f"object {key} has an unknown encryption format (version {head[8]}, algorithm {head[9]})",
                hint="written by a newer dbops, or damaged")
        kid = head[12:20].hex()
        master = self.keys.by_id.get(kid)
        if master is None:
            raise self._key_error(key, kid)
        return OpenedObject(object_key(master, head[20:52]), head[:HEADER] + self._name(key))

    def _key_error(self, key: str, kid: str) -> EncryptionError:
        if not self.keys.by_id:
            return EncryptionError(
                f"the archive is encrypted (object {key} needs key ID {kid}) and no encryption key is configured",
                hint="set storage.encryption.key_file (or key) to the archive's key; without it the data cannot be read")
        return EncryptionError(
            f"wrong encryption key: object {key} needs key ID {kid}",
            detail="configured key IDs: " + ", ".join(self.keys.ids),
            hint="configure the key with that ID (storage.encryption.key, or old_keys after a rotation)")

    def _plain(self, key: str) -> None:
        """A plain object was read: fine without encryption, refused with it unless migrating."""
        if self.keys.current is not None and not self.keys.allow_plaintext:
            raise EncryptionError(
                f"object {key} is not encrypted, but storage.encryption is configured",
                detail="this archive (or part of it) was written without encryption",
                hint="to migrate an existing plain archive set storage.encryption.allow_plaintext: true "
                     "(new objects are encrypted, old ones stay readable); otherwise check storage.prefix")

    def open(self, key: str, data: bytes) -> bytes:
        """The plaintext of a whole stored object."""
        if not is_encrypted(data):
            self._plain(key)
            return data
        o = self._open_header(key, data[:HEADER])
        mv = memoryview(data)[HEADER:]
        n = max(1, -(-len(mv) // STEP))
        if len(mv) < TAG or len(mv) % STEP and len(mv) % STEP < TAG:
            raise DamagedObjectError(f"object {key} is truncated ({len(data)} bytes)")
        out = bytearray(len(mv) - n * TAG)
        om, w = memoryview(out), 0
        for i in range(n):
            w += o.segment_into(i, mv[i * STEP:(i + 1) * STEP], om[w:], key, last=(i == n - 1))
        return bytes(out)

    # ------------------------------------------------------------------ protocol: writes

    def put(self, key: str, data: bytes, *, metadata: dict[str, str] | None = None, **kw) -> bool:
        """kw: the store's conditions (if_absent, if_match), passed on unchanged."""
        with self._lock:
            self._headers.pop(key, None)
        if self.keys.current is None:
            return self.inner.put(key, data, metadata=metadata, **kw)
        meta = dict(metadata or {})
        meta[META_KEY_ID] = self.keys.current_id or ""
        return self.inner.put(key, self.seal(key, data), metadata=meta, **kw)

    def put_file(self, key: str, path: str, *, metadata: dict[str, str] | None = None, **kw) -> bool:
        """Sealed in memory up to memory_limit bytes and sent as one body; a larger file is sealed
        into a temporary file beside path (packs and manifests are spooled there), then stored."""
        if self.keys.current is None:
            return self.inner.put_file(key, path, metadata=metadata, **kw)
        with self._lock:
            self._headers.pop(key, None)
        meta = dict(metadata or {})
        meta[META_KEY_ID] = self.keys.current_id or ""
        with open(path, "rb", buffering=0) as src:
            size = os.fstat(src.fileno()).st_size
            if size <= self.memory_limit:
                body = self.seal_file(key, src, size=size)
                assert body is not None
                return self.inner.put(key, body, metadata=meta, **kw)
            fd, sealed = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".sealed-")
            try:
                with os.fdopen(fd, "wb") as dst:
                    self.seal_file(key, src, dst, size=size)
                return self.inner.put_file(key, sealed, metadata=meta, **kw)
            finally:
                os.unlink(sealed)

    def __getattr__(self, name: str):
        # Only the attributes that name the store in messages (dbops.storage.probe); never a data
        # path, so no read or write can go around the encryption.
        if name in ("s", "bucket", "root"):
            return getattr(self.inner, name)
        raise AttributeError(name)

    # ------------------------------------------------------------------ protocol: reads

    def get(self, key: str) -> bytes:
        return self.open(key, self.inner.get(key))

    def get_to_file(self, key: str, path: str) -> ObjectInfo:
        """Downloaded into path, then opened there in place, 1 MiB at a time (plaintext segment i
        starts before its ciphertext, so nothing unread is overwritten), and cut to the plaintext."""
        info = self.inner.get_to_file(key, path)
        with open(path, "r+b", buffering=0) as f:
            head = f.read(HEADER)
            if not is_encrypted(head):
                self._plain(key)
                return info
            o = self._open_header(key, head)
            stored = os.fstat(f.fileno()).st_size - HEADER
            n = max(1, -(-stored // STEP))
            if stored < TAG or stored % STEP and stored % STEP < TAG:
                raise DamagedObjectError(f"object {key} is truncated ({stored + HEADER} bytes)")
            ct, pt = bytearray(BATCH * STEP), bytearray(BATCH * SEGMENT)
            cmv, pmv = memoryview(ct), memoryview(pt)
            size = 0
            for first in range(0, n, BATCH):
                got = os.preadv(f.fileno(), [cmv], HEADER + first * STEP)
                w = 0
                for j in range(min(BATCH, n - first)):
                    i = first + j
                    w += o.segment_into(i, cmv[j * STEP:min(got, (j + 1) * STEP)], pmv[w:], key, last=(i == n - 1))
                os.pwrite(f.fileno(), pmv[:w], size)
                size += w
            os.ftruncate(f.fileno(), size)
        return ObjectInfo(key=info.key, size=size, etag=info.etag, last_modified=info.last_modified,
                          metadata=info.metadata)

    def _header_of(self, key: str) -> OpenedObject | None:
        with self._lock:
            if key in self._headers:
                return self._headers[key]
        head = self.inner.get_range(key, 0, HEADER)
        opened = self._open_header(key, head) if is_encrypted(head) else None
        if opened is None:
            self._plain(key)
        with self._lock:
            if len(self._headers) > 4096:
                self._headers.clear()
            self._headers[key] = opened
        return opened

    def get_range(self, key: str, start: int, length: int) -> bytes:
        with self.open_range(key, start, length) as src:
            return src.read(length)

    def open_range(self, key: str, start: int, length: int) -> RangeReader:
        """get_range's plaintext as it arrives: the sealed segments covering the range are read
        ``BATCH`` at a time and each is opened (checked) before any of its bytes is handed out."""
        if self.keys.current is None and not self.keys.by_id:
            return self.inner.open_range(key, start, length)
        if length <= 0:
            return BytesRange(b"")
        o = self._header_of(key)
        if o is None:
            return self.inner.open_range(key, start, length)
        i0, i1 = start // SEGMENT, (start + length - 1) // SEGMENT
        ct_start = HEADER + i0 * STEP
        try:
            src = self.inner.open_range(key, ct_start, (i1 - i0 + 1) * STEP)
        except NotFoundError:
            raise
        except StorageError:
            info = self.inner.head(key)  # S3 refuses a range starting past the end: a truncated object
            if info is None:
                raise NotFoundError(f"object {key} not found") from None
            if info.size <= ct_start:
                return BytesRange(b"")
            raise
        from dbops.storage.cryptrange import OpenedRange

        return OpenedRange(o, key, src, i0, start - i0 * SEGMENT, length)

    def head(self, key: str) -> ObjectInfo | None:
        return self.inner.head(key)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        with self._lock:
            self._headers.pop(key, None)
        self.inner.delete(key)

    def delete_many(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        with self._lock:
            for k in keys:
                self._headers.pop(k, None)
        self.inner.delete_many(keys)

    def check(self) -> None:
        self.inner.check()

    def server_time(self) -> float | None:
        return self.inner.server_time()

    def requests(self) -> dict[str, int]:
        """The requests the store below has sent (ObjectStore.requests)."""
        return self.inner.requests()

    # ------------------------------------------------------------------ reporting

    def key_id_of(self, key: str) -> str | None:
        """The key ID an object was sealed with (None: stored plain). NotFoundError when absent."""
        try:
            head = self.inner.get_range(key, 0, HEADER)
        except StorageError:
            if self.inner.head(key) is None:
                raise NotFoundError(f"object {key} not found") from None
            raise
        return header_key_id(head)

