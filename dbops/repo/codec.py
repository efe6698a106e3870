"""Chunk encoding: hashing, all-zero detection, zstd per thread (zstandard releases the GIL)."""

from __future__ import annotations

import functools
import hashlib
import threading

import zstandard

from dbops.errors import ConfigError

ALGORITHMS = ("zstd", "none")


def sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


@functools.lru_cache(maxsize=64)
def zero_hash(n: int) -> str:
    """sha256 of n zero bytes (an all-zero chunk is recognised by its hash)."""
    return sha256(bytes(n))


class Encoder:
    """Compresses chunks with one zstd context per thread; keeps a chunk raw when that is smaller."""

    def __init__(self, algorithm: str = "zstd", level: int = 3):
        if algorithm not in ALGORITHMS:
            raise ConfigError(f"unknown compression algorithm {algorithm!r} (known: {', '.join(ALGORITHMS)})")
        self.algorithm = algorithm
        self.level = level
        self._local = threading.local()

    def encode(self, raw: bytes | memoryview) -> bytes:
        """The bytes to store. Shorter than raw means zstd; equal length means stored raw."""
        if self.algorithm == "none":
            return bytes(raw)
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(level=self.level)
        out = c.compress(raw)
        return out if len(out) < len(raw) else bytes(raw)


class Decoder:
    def __init__(self) -> None:
        self._local = threading.local()

    def decode(self, stored: bytes, raw_length: int) -> bytes:
        """Inverse of Encoder.encode; raises zstandard.ZstdError on a damaged frame."""
        if len(stored) == raw_length:
            return stored
        d = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = zstandard.ZstdDecompressor()
        return d.decompress(stored, max_output_size=raw_length)
