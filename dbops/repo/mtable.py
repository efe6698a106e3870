"""A file's block table in a manifest (formats 2 to 5; see :mod:`dbops.repo.mformat`): its blocks'
columns (sha256 digests, pack numbers, frame offsets, lengths, raw lengths, offsets in the frame)
and, from format 4, each block's page mask and its base block's columns."""

from __future__ import annotations

import sys
from array import array
from collections.abc import Callable, Iterable

from dbops.repo.model import ChunkRef

ON_BASE = 1 << 63  # format 5: in a mask, the delta's frame is compressed against its base
_COLUMNS = ("I", "Q", "I", "I", "I")  # pack number, frame offset, frame length, frame raw length, offset in frame
_WIDTH = 32 + sum(array(t).itemsize for t in _COLUMNS)
_DELTA_COLUMNS = ("Q",)  # format 4: the page mask (0: a whole block)
BASE_HASH = 16  # format 4: bytes of a base block's sha256 kept (the first 128 bits)
_WIDTH4 = 2 * _WIDTH + 8 - (32 - BASE_HASH)  # the block's columns, the mask, its base's columns (zeros if none)
_ZERO_HASH = "0" * 64


def blocks_of(size: int, block: int) -> int:
    return -(-size // block) if size else 0


def _columns(chunks: list[ChunkRef], number: Callable[[str | None], int], hash_bytes: int = 32) -> list[bytes]:
    cols = [array(t) for t in _COLUMNS]
    cols[0].extend(number(c.pack) for c in chunks)
    cols[1].extend(c.offset for c in chunks)
    cols[2].extend(c.length for c in chunks)
    cols[3].extend(c.frame_raw for c in chunks)
    cols[4].extend(c.at for c in chunks)
    if sys.byteorder == "big":
        for col in cols:
            col.byteswap()
    return [bytes.fromhex("".join(c.hash[:2 * hash_bytes] for c in chunks)), *(col.tobytes() for col in cols)]


def encode_table(chunks: Iterable[ChunkRef], number: Callable[[str | None], int], fmt: int = 5) -> bytes:
    """A file's block table. Format 4 adds, after format 3's columns, the page mask of each block
    and its base's columns (all zeros for a block that is not a delta: they compress away);
    format 5 marks a delta compressed against its base with ``ON_BASE`` in its mask."""
    chunks = list(chunks)
    if fmt < 4:
        if any(c.mask for c in chunks):
            raise ValueError("format 3 cannot hold page deltas")
        return b"".join(_columns(chunks, number))
    if fmt < 5 and any(c.on_base for c in chunks):
        raise ValueError("format 4 cannot hold page deltas compressed against their base")
    masks = array("Q", (c.mask | ON_BASE if c.on_base else c.mask for c in chunks))
    if sys.byteorder == "big":
        masks.byteswap()
    none = ChunkRef(_ZERO_HASH, None, 0, 0, 0)
    bases = [c.base if c.mask and c.base is not None else none for c in chunks]
    return b"".join([*_columns(chunks, number), masks.tobytes(),
                     *_columns(bases, lambda p: 0 if p is None else number(p), BASE_HASH)])


def _decode_columns(table: bytes | memoryview, raws: list[int], pack_name: Callable[[int], str | None],
                    hash_bytes: int = 32) -> list[ChunkRef]:
    n, w = len(raws), 2 * hash_bytes
    hx = bytes(table[:hash_bytes * n]).hex()
    hashes = [hx[i:i + w] for i in range(0, w * n, w)]
    pos, cols = hash_bytes * n, []
    for t in _COLUMNS:
        col = array(t)
        col.frombytes(table[pos:pos + n * col.itemsize])
        if sys.byteorder == "big":
            col.byteswap()
        cols.append(col)
        pos += n * col.itemsize
    packs = list(map(pack_name, cols[0]))
    return list(map(ChunkRef, hashes, packs, cols[1], cols[2], raws, cols[4], cols[3]))


def decode_table(table: bytes | memoryview, raws: list[int], pack_name: Callable[[int], str | None],
                 fmt: int = 3) -> list[ChunkRef]:
    n = len(raws)
    width = _WIDTH4 if fmt >= 4 else _WIDTH
    if len(table) != n * width:
        raise ValueError(f"block table has {len(table)} bytes, {n} blocks need {n * width}")
    refs = _decode_columns(table[:n * _WIDTH], raws, pack_name)
    if fmt < 4:
        return refs
    masks = array("Q")
    masks.frombytes(table[n * _WIDTH:n * _WIDTH + 8 * n])
    if sys.byteorder == "big":
        masks.byteswap()
    if not any(masks):
        return refs
    bases = _decode_columns(table[n * _WIDTH + 8 * n:], raws, pack_name, BASE_HASH)
    # (refs built whole: NamedTuple._replace costs 3 times as much, for every delta of a backup)
    if fmt < 5:  # a set ON_BASE bit is a mask naming pages beyond any block: refused by check_entry
        return [ChunkRef(*r[:7], m, b) if m else r for r, m, b in zip(refs, masks, bases)]
    return [ChunkRef(*r[:7], m & ~ON_BASE, b, bool(m & ON_BASE)) if m else r
            for r, m, b in zip(refs, masks, bases)]


def raw_lengths(size: int, block: int) -> list[int]:
    k = blocks_of(size, block)
    if not k:
        return []
    return [block] * (k - 1) + [size - (k - 1) * block]
