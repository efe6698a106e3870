"""Block sizes by file size, and which blocks the page-LSN rule may take from the parent unread.

Block size: small files (catalogs, configuration) in blocks of the configured chunk size
(8 KiB by default, one page); larger files in larger blocks, so that a relation's 1 GiB
segment has 16,384 block records instead of 131,072 and the manifest stays near 0.6 MB per
GiB (each record: a 32-byte sha256 and a compressed frame reference), like pgBackRest's block
incremental sizes blocks by file size.

Page-LSN rule (:func:`pages_not_newer`): in a data folder that is the parent backup restored
and then WAL from the parent's REDO point replayed (by a server that does not write hint bits:
data checksums or ``wal_log_hints = on``), a page whose LSN is not newer than that REDO point
was touched by no replayed record, so it holds exactly what the parent stored. Only the main
fork of a relation qualifies (its pages carry the LSN of their last WAL-logged change); the
free space map and visibility map forks change without a new page LSN, and other files have
no page LSN at all, so they are always hashed. Pages with LSN 0 (new or unlogged pages) are
hashed too.

Page deltas (:func:`changed_mask`): the same rule page by page. In a main-fork block whose
parent reference is a full block, the pages whose LSN is 0 or newer than the parent's REDO
point are the changed ones; the backup stores only those pages (a delta on the parent's block,
its base), compressed with the base block's same pages as zstd dictionary (format 5, see
:meth:`dbops.repo.codec.Encoder.encode_on`): a pgbench update changes a few bytes of a page, so
even a block whose every page changed stores far less as a delta than whole (measured: 5x less
for blocks with all 8 pages changed), and any number of changed pages makes a delta. When the
parent's reference is itself a delta, the new delta keeps that delta's base and covers the union
of both masks (taken from the local block, which holds them all): depth is always one, so a
restore reads at most the base and one delta for a block.

A restore writes a delta's pages (checked against their sha256) over its base block (written
before, checked against its own) with :func:`delta_writes`: one write per run of consecutive pages.
"""

from __future__ import annotations

import functools
import re

from dbops.repo.model import PAGE, ChunkRef

SMALL_FILE = 1 << 20
MEDIUM_FILE = 16 << 20
MEDIUM_BLOCK = 32 * 1024
LARGE_BLOCK = 64 * 1024

_MAIN_FORK_RE = re.compile(r"^(?:base/\d+|global|pg_tblspc/\d+/[^/]+/\d+)/\d+(?:\.\d+)?$")
_WORDS_PER_PAGE = PAGE // 4


def changed_mask(block: memoryview, lsn: int) -> int:
    """Bit i set when page i of the block has LSN 0 or an LSN newer than ``lsn``; -1 for a
    block that is not whole pages."""
    if not block or len(block) % PAGE:
        return -1
    words = block.cast("I")
    mask = 0
    for i, (hi, lo) in enumerate(zip(words[0::_WORDS_PER_PAGE], words[1::_WORDS_PER_PAGE])):
        page_lsn = hi << 32 | lo
        if page_lsn == 0 or page_lsn > lsn:
            mask |= 1 << i
    return mask


def all_new(block: memoryview) -> bool:
    """Every page of the block has LSN 0 (new, or zeroed): hashed like a new block, never a delta
    (an all-zero block is then not stored at all)."""
    words = block.cast("I")
    return not any(words[0::_WORDS_PER_PAGE]) and not any(words[1::_WORDS_PER_PAGE])


def delta_allowed(mask: int, block_len: int) -> bool:
    """A delta of these pages can be stored: at least one page, none beyond the block (compressed
    against its base, a delta of every page still stores less than the whole block)."""
    return mask > 0 and not block_len % PAGE and not mask >> (block_len // PAGE)


def delta_of(block: memoryview, mask: int, pref: ChunkRef) -> tuple[bytes, int, ChunkRef] | None:
    """(payload, mask, base) of a page delta for a block whose changed pages are ``mask``, against
    the parent's ref: a whole block (the base) or a delta (its base, the masks' union); None when
    the parent's ref holds no base for this block (see :func:`delta_allowed`)."""
    if pref.mask:
        base, mask = pref.base, mask | pref.mask
    else:
        base = pref
    if base is None or base.raw != len(block) or not delta_allowed(mask, len(block)):
        return None
    return same_pages(block, mask), mask, base


def delta_writes(pages: bytes | memoryview, mask: int, block_len: int) -> list[tuple[int, memoryview]]:
    """Where a page delta's pages go in its block: (offset in the block, bytes) for each run of
    consecutive pages (one write each); ``pages`` as :func:`delta_of` stores them (the pages set in
    ``mask``, in increasing order). Raises ValueError when they do not fit a block of ``block_len``
    bytes (a manifest's deltas are checked when it is read: a restore never gets here with a bad one)."""
    spans = page_runs(mask)
    if (block_len % PAGE or not spans or spans[-1][0] + spans[-1][1] > block_len // PAGE
            or len(pages) != mask.bit_count() * PAGE):
        raise ValueError(f"a page delta of {len(pages)} bytes with mask {mask:#x} does not fit a block of "
                         f"{block_len} bytes")
    view, out, k = memoryview(pages), [], 0
    for first, n in spans:
        out.append((first * PAGE, view[k:k + n * PAGE]))
        k += n * PAGE
    return out


def differing(payload: bytes, mask: int, old: bytes | memoryview) -> tuple[bytes, int, bytes | memoryview]:
    """(the pages of a delta's payload that differ from their previous versions, their mask, those
    previous versions); ``old``: the base block's pages in ``mask`` (:func:`same_pages`)."""
    keep, out, was = 0, [], []
    for k, p in enumerate(pages_of(mask)):
        page, before = payload[k * PAGE:(k + 1) * PAGE], old[k * PAGE:(k + 1) * PAGE]
        if page != before:
            keep |= 1 << p
            out.append(page)
            was.append(before)
    return (payload, mask, old) if keep == mask else (b"".join(out), keep, b"".join(was))


def same_pages(block: bytes | memoryview, mask: int) -> bytes:
    """The block's pages set in the mask, concatenated: a delta's payload (:func:`delta_of`), and
    from its base block, a format 5 delta's zstd dictionary
    (its pages' previous versions, aligned with them; measured on pgbench pages, as small as the
    whole block as dictionary and 7 times faster to load for a delta of one page)."""
    return b"".join([block[first * PAGE:(first + n) * PAGE] for first, n in page_runs(mask)])


def pages_view(block: bytes | memoryview, mask: int) -> bytes | memoryview:
    """:func:`same_pages` without a copy when the pages are consecutive (a slice of ``block``, valid
    as long as it is): what a delta is decoded with."""
    spans = page_runs(mask)
    if len(spans) == 1:
        first, n = spans[0]
        return memoryview(block)[first * PAGE:(first + n) * PAGE]
    return same_pages(block, mask)


def pages_of(mask: int) -> list[int]:
    """The page numbers set in a mask, in increasing order (the order a delta stores them in)."""
    out, i = [], 0
    while mask:
        if mask & 1:
            out.append(i)
        mask >>= 1
        i += 1
    return out


@functools.lru_cache(maxsize=4096)
def page_runs(mask: int) -> tuple[tuple[int, int], ...]:
    """The runs of consecutive pages set in a mask: (first page, number of pages) each, in
    increasing order (a block of 64 KiB has 256 masks: each is worked out once)."""
    out: list[tuple[int, int]] = []
    for p in pages_of(mask):
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return tuple(out)


def block_size(size: int, chunk_size: int) -> int:
    """The block size for a file of this size (a multiple of chunk_size, itself of 8 KiB)."""
    if size < SMALL_FILE:
        want = chunk_size
    elif size < MEDIUM_FILE:
        want = MEDIUM_BLOCK
    else:
        want = LARGE_BLOCK
    return max(chunk_size, want - want % chunk_size)


def is_main_fork(path: str) -> bool:
    """A relation's main fork segment (base/<db>/<relfilenode>[.<n>], global/..., tablespaces)."""
    return bool(_MAIN_FORK_RE.match(path))


def pages_not_newer(block: memoryview, lsn: int) -> bool:
    """True when every page of the block has an LSN in (0, lsn] (pd_lsn: the page's first 8
    bytes, two native-endian 32-bit halves, high first). False for a partial page."""
    if not block or len(block) % PAGE:
        return False
    words = block.cast("I")
    for hi, lo in zip(words[0::_WORDS_PER_PAGE], words[1::_WORDS_PER_PAGE]):
        page_lsn = hi << 32 | lo
        if page_lsn == 0 or page_lsn > lsn:
            return False
    return True
