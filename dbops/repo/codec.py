"""Chunk encoding: hashing, all-zero detection, zstd per thread (zstandard releases the GIL).

A page delta (format 5) is compressed with its base's pages (their previous versions) as a zstd
dictionary (raw content: no training, the base is simply the history the delta's matches refer
to). It is written in one call into zstd's own functions as zstandard's cffi backend builds
them in, on a compression context kept per thread: ``ZSTD_compress_usingDict`` with the base as
raw content, or, for a base that begins with zstd's dictionary magic (which that call would parse
as a structured dictionary), ``ZSTD_CCtx_refPrefix`` then ``ZSTD_compress2``. Where those functions
are not there, through the standard library's ``compression.zstd``, or its backport before Python
3.14, with the base as a single-use *prefix* (the same frames, byte for byte, when both bundle
the same zstd release): no dictionary is digested for a frame compressed once. A prefix and a raw-content dictionary of the same bytes
give frames that decode either way, so :meth:`Decoder.decode_on` (a raw-content dictionary)
reads deltas written before and after this change alike.

Level: ``DELTA_LEVEL`` at least. Measured on 3,000 page deltas of a pgbench incremental (scale
100, 30 s of updates; one CPU, per delta): level 6 with a digested dictionary (what dbops wrote
before) 73 us and 0.294 MB; as a prefix, level 6 62 us (1.01x the bytes), level 3 30 us (1.38x),
level 1 22.5 us (1.53x); level 2 stored deltas of 4 pages or more up to 10 times larger, so a
level below ``DELTA_LEVEL`` is never used for deltas."""

from __future__ import annotations

import functools
import hashlib
import threading

import zstandard

from dbops.errors import ConfigError, PreconditionError

ALGORITHMS = ("zstd", "none")
DELTA_LEVEL = 3


@functools.lru_cache(maxsize=1)
def prefix_zstd():
    """The zstd module that compresses with a prefix (a single-use dictionary): the standard
    library's ``compression.zstd`` (Python 3.14), its backport before. Imported on first use: only a
    backup writing page deltas needs it, so a restore, ``verify`` or a WAL command still runs where
    an upgrade left the environment without it."""
    try:
        from compression import zstd  # type: ignore[import-not-found]
    except ImportError:
        try:
            from backports import zstd  # type: ignore[no-redef]
        except ImportError as e:
            raise PreconditionError(
                "dbops needs the package backports.zstd before Python 3.14 to write page deltas "
                "(pyproject.toml): reinstall dbops (pip install, or `make venv` in a checkout)") from e
    return zstd


def _base_dict(base: bytes | memoryview) -> zstandard.ZstdCompressionDict:
    return zstandard.ZstdCompressionDict(bytes(base), dict_type=zstandard.DICT_TYPE_RAWCONTENT)


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

    def encode_on(self, raw: bytes | memoryview, base: bytes | memoryview) -> bytes:
        """A page delta's bytes to store: zstd with ``base`` (its pages' previous versions) as
        prefix (content size in the frame header, no dictionary id, no checksum: the caller keeps
        the pages' sha256), or raw when that is not shorter (or compression is off). One call into
        zstd (``ZSTD_compress_usingDict``, the base as raw content; the GIL released) on this thread's
        compression context (:func:`zstd_compress_functions`); without them, the prefix module's
        compressor made for the delta (:func:`prefix_zstd`): the same frame, byte for byte."""
        if self.algorithm == "none":
            return bytes(raw)
        level = max(self.level, DELTA_LEVEL)
        zstd = zstd_compress_functions()
        if zstd is None:
            stdzstd = prefix_zstd()
            prefix = stdzstd.ZstdDict(bytes(base), is_raw=True).as_prefix
            c = stdzstd.ZstdCompressor(level=level, zstd_dict=prefix)
            out = c.compress(raw, stdzstd.ZstdCompressor.FLUSH_FRAME)
            return out if len(out) < len(raw) else bytes(raw)
        ffi, lib = zstd
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = self._local.cctx = _compression_context(ffi, lib, level)
        n = len(raw)
        cap = _bound(n)
        out = getattr(self._local, "out", None)
        if out is None or len(out) < cap:
            out = self._local.out = bytearray(max(cap, 160 * 1024))  # reused: a delta is at most a block
        # One call into zstd: each call releases the GIL, and taking it back waits for whichever store
        # thread took it meanwhile, so the bound and the error checks are worked out here instead, and
        # the base is given as a raw-content dictionary in the same call (the same frame as a prefix:
        # no dictionary id, no checksum, the content size). A base starting with the dictionary magic
        # would be parsed as a structured dictionary there: it goes as a prefix (two calls).
        if bytes(base[:4]) != _DICT_MAGIC:
            got = lib.ZSTD_compress_usingDict(cctx, ffi.from_buffer(out), cap, ffi.from_buffer(raw), n,
                                              ffi.from_buffer(base), len(base), level)
        else:
            prefix = ffi.from_buffer(base)  # referenced for the next frame only (alive until then)
            got = lib.ZSTD_CCtx_refPrefix(cctx, prefix, len(base))
            if not got:
                got = lib.ZSTD_compress2(cctx, ffi.from_buffer(out), cap, ffi.from_buffer(raw), n)
        if got <= cap:
            return bytes(memoryview(out)[:got]) if got < n else bytes(raw)
        self._local.cctx = None  # a context that failed is not used again
        why = ffi.string(lib.ZSTD_getErrorName(got)).decode() if lib.ZSTD_isError(got) else f"{got} bytes"
        raise zstandard.ZstdError(f"compression error: {why}")


_DICT_MAGIC = bytes.fromhex("37a430ec")  # ZSTD_MAGIC_DICTIONARY, little-endian


def _bound(n: int) -> int:
    """At least zstd's ``ZSTD_COMPRESSBOUND(n)`` (n + n/256, plus up to 64 bytes under 128 KiB): a frame
    of n bytes always fits, so ``ZSTD_compress2`` returns a size or an error code (from -1 down, as
    a size_t: never a size up to this bound)."""
    return n + (n >> 8) + 1024


def _compression_context(ffi, lib, level: int):
    """A zstd compression context writing frames as :func:`prefix_zstd`'s compressor does at this
    level: no checksum, no dictionary id (the content size is written: ``ZSTD_compress2`` knows it)."""
    made = lib.ZSTD_createCCtx()
    if made == ffi.NULL:
        raise MemoryError("zstd could not create a compression context")
    cctx = ffi.gc(made, lib.ZSTD_freeCCtx)
    for param, value in ((lib.ZSTD_c_compressionLevel, level), (lib.ZSTD_c_checksumFlag, 0),
                         (lib.ZSTD_c_dictIDFlag, 0)):
        got = lib.ZSTD_CCtx_setParameter(cctx, param, value)
        if lib.ZSTD_isError(got):
            raise zstandard.ZstdError(f"compression setting error: {ffi.string(lib.ZSTD_getErrorName(got)).decode()}")
    return cctx


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

    def decode_on(self, stored: bytes | memoryview, raw_length: int, base: bytes | memoryview) -> bytes | bytearray:
        """Inverse of Encoder.encode_on (the same base bytes); raises zstandard.ZstdError on a
        damaged frame. A wrong base decodes to wrong bytes: the caller checks them against their sha256.
        One call into zstd on this thread's decompression context (:func:`zstd_functions`): the base
        as a raw-content dictionary (``ZSTD_decompress_usingDict``), or, for a base that begins with
        zstd's dictionary magic (which that call would parse as a structured dictionary), as a
        prefix (``ZSTD_DCtx_refPrefix`` then ``ZSTD_decompressDCtx``); without those functions, a
        dictionary and a context made for the delta."""
        if len(stored) == raw_length:
            return bytes(stored)
        zstd = zstd_functions()
        if zstd is None:
            d = zstandard.ZstdDecompressor(dict_data=_base_dict(base))
            return d.decompress(stored, max_output_size=raw_length)
        ffi, lib = zstd
        dctx = getattr(self._local, "dctx", None)
        if dctx is None:
            made = lib.ZSTD_createDCtx()
            if made == ffi.NULL:
                raise MemoryError("zstd could not create a decompression context")
            dctx = self._local.dctx = ffi.gc(made, lib.ZSTD_freeDCtx)
        out = bytearray(raw_length)
        # Each call into zstd releases the GIL, and taking it back waits for whichever restore thread
        # took it meanwhile: one call a delta, not two. A raw-content dictionary and a prefix of the
        # same bytes decode a frame alike (no dictionary id in it); a base starting with the
        # dictionary magic (37 A4 30 EC) goes as a prefix, referenced for the next frame only
        # (the buffer stays alive until then), never parsed.
        if base[:4] != _DICT_MAGIC:
            n = lib.ZSTD_decompress_usingDict(dctx, ffi.from_buffer(out), raw_length, ffi.from_buffer(stored),
                                              len(stored), ffi.from_buffer(base), len(base))
        else:
            prefix = ffi.from_buffer(base)
            n = lib.ZSTD_DCtx_refPrefix(dctx, prefix, len(base))
            if not lib.ZSTD_isError(n):
                n = lib.ZSTD_decompressDCtx(dctx, ffi.from_buffer(out), raw_length, ffi.from_buffer(stored),
                                            len(stored))
        if n == raw_length:
            return out
        if lib.ZSTD_isError(n):
            raise zstandard.ZstdError(f"decompression error: {ffi.string(lib.ZSTD_getErrorName(n)).decode()}")
        return out[:n]  # fewer bytes than expected: the caller reports it


@functools.lru_cache(maxsize=1)
def zstd_functions():
    """(ffi, lib): zstd's own functions, as the zstandard package builds them in for its cffi backend
    (``zstandard.backend_cffi``: the same zstd as its C backend), or None where that backend is not
    installed. A restore decodes each page delta with one call (``ZSTD_decompress_usingDict``, the GIL
    released) on a context kept per thread: measured on a pgbench incremental's deltas, 4-8 us
    a delta of 1-2 pages where a dictionary and a decompressor made for each took 12-30 us."""
    try:
        from zstandard import backend_cffi

        ffi, lib = backend_cffi.ffi, backend_cffi.lib
        for name in ("ZSTD_createDCtx", "ZSTD_freeDCtx", "ZSTD_DCtx_refPrefix", "ZSTD_decompressDCtx",
                     "ZSTD_decompress_usingDict", "ZSTD_isError", "ZSTD_getErrorName"):
            getattr(lib, name)
    except (ImportError, AttributeError):  # no cffi, or a zstandard release built without these
        return None
    return ffi, lib


@functools.lru_cache(maxsize=1)
def zstd_compress_functions():
    """(ffi, lib) as :func:`zstd_functions`, with zstd's compression functions a page delta is written
    with, or None where they are not there. Measured on 3,000 page deltas (one CPU): 11.5 us a delta
    on a context kept per thread, 27 us with a prefix dictionary and a compressor made for each
    (``backports.zstd``, the fallback); byte-identical frames."""
    zstd = zstd_functions()
    if zstd is None:
        return None
    lib = zstd[1]
    try:
        for name in ("ZSTD_createCCtx", "ZSTD_freeCCtx", "ZSTD_CCtx_setParameter", "ZSTD_CCtx_refPrefix",
                     "ZSTD_compress2", "ZSTD_compress_usingDict", "ZSTD_c_compressionLevel", "ZSTD_c_checksumFlag",
                     "ZSTD_c_dictIDFlag"):
            getattr(lib, name)
    except AttributeError:  # a zstandard release built without them
        return None
    return zstd
