"""The manifest's records: a file and its blocks, PostgreSQL's state of the snapshot."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

FILE, DIR, SYMLINK = "file", "dir", "symlink"
PAGE = 8192  # PostgreSQL's page: the unit of a page delta


class ChunkRef(NamedTuple):
    """One block of a file and the stored frame holding it (a tuple: many per file)."""

    hash: str  # sha256 hex of the raw block
    pack: str | None  # None: all zeros, not stored
    offset: int  # the frame's offset in the pack
    length: int  # the frame's stored length
    raw: int  # the block's length
    at: int = 0  # the block's offset in the decompressed frame
    frame_raw: int = 0  # the frame's uncompressed length
    # A page delta (format 4): the frame holds only the pages set in ``mask`` (bit i: the block's
    # page i), concatenated; ``hash`` is their sha256; the other pages are ``base``'s, a full block.
    mask: int = 0
    base: ChunkRef | None = None
    # Format 5: the delta's frame holds only it, zstd-compressed with ``base``'s raw block as its
    # dictionary: decoding it needs the base block's bytes (see codec.Decoder.decode_on).
    on_base: bool = False

    @property
    def is_zero(self) -> bool:
        return self.pack is None

    @property
    def stored_raw(self) -> int:
        """The bytes this ref's frame holds for it: the block, or a delta's changed pages."""
        return self.mask.bit_count() * PAGE if self.mask else self.raw

    @property
    def compressed(self) -> bool:
        return self.length < self.frame_raw


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the data folder, "/"-separated; "." is the folder itself
    type: str  # file | dir | symlink
    mode: int  # permission bits (stat.S_IMODE)
    mtime_ns: int
    size: int = 0
    target: str | None = None  # symlinks only
    chunks: tuple[ChunkRef, ...] = ()  # the file's blocks, in order
    block: int = 0  # block size of this file (0: the manifest's chunk size)

    def with_chunks(self, chunks: tuple[ChunkRef, ...]) -> FileEntry:
        return dataclasses.replace(self, chunks=chunks)


@dataclass(frozen=True)
class PgState:
    """What PostgreSQL's control data says about the snapshot."""

    pg_version: str  # PG_VERSION, e.g. "15"
    system_identifier: str
    timeline: int
    redo_lsn: int  # checkpoint REDO: WAL from here on is needed to start
    consistent_lsn: int  # the snapshot is consistent once WAL up to here is replayed
    consistent_time: float  # epoch seconds the snapshot's contents correspond to
    wal_segment_size: int = 16 * 1024 * 1024
    data_checksums: bool = False


def path_key(path: str) -> tuple[str, ...]:
    """The order entries are walked and stored in: parents first, siblings by name."""
    return () if path == "." else tuple(path.split("/"))
