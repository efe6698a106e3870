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
"""

from __future__ import annotations

import re

PAGE = 8192
SMALL_FILE = 1 << 20
MEDIUM_FILE = 16 << 20
MEDIUM_BLOCK = 32 * 1024
LARGE_BLOCK = 64 * 1024

_MAIN_FORK_RE = re.compile(r"^(?:base/\d+|global|pg_tblspc/\d+/[^/]+/\d+)/\d+(?:\.\d+)?$")
_WORDS_PER_PAGE = PAGE // 4


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
