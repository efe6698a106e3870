"""Manifest encodings: format 5 (written, streamed file by file), formats 4, 3, 2 and 1 (read).

Format 3: ``MAGIC3``, a 4-byte length and the zstd-compressed JSON header (everything but the
entries: PostgreSQL state, sizes, counts, the ``packs`` id table, ``referenced_bytes``), then
one zstd stream of entry records in walk order. A record is a 4-byte length, then a 4-byte
length and the entry's JSON (path, type, mode, mtime_ns, size, target, block), then the
entry's block table, column by column: sha256 digests (32 bytes), pack numbers (u32,
``NO_PACK`` for an all-zero block), frame offsets (u64), frame lengths, frame raw lengths,
offsets in the frame (u32 each). Block counts and raw lengths follow from size and block.

Format 4 (``MAGIC4``, read): format 3 with more columns in each block table, after the
others: the page mask (u64; 0 for a whole block), then the base block's columns in the same
layout (its sha256's first 16 bytes, pack number, frame offset, frame length, frame raw length,
offset in frame; all zeros for a whole block, so they compress away). A block with a mask is a
page delta (see :mod:`dbops.repo.blocks`): its own columns locate the changed pages
(concatenated, in page order; the sha256 is theirs), the base's locate the whole block they
apply to (the base's raw length is the block's). Writing and reading hold one entry at a time:
memory does not grow with the database.

Format 5 (``MAGIC5``, written): format 4's layout; bit 63 of a mask (``ON_BASE``) marks a delta
whose frame holds only its pages, zstd-compressed with the base block's raw bytes as dictionary
(see :meth:`dbops.repo.codec.Encoder.encode_on`): such a frame starts at offset 0 and its raw
length is the delta's pages. A delta without the bit (one kept from a format 4 parent) is read as
in format 4. The sha256 of a delta is always over its uncompressed pages: a verified base and a
payload that decodes to the recorded hash give back the block.

Format 2 (read only): ``MAGIC``, the header with every entry in it, then one chunk table for
all files (the same columns); format 1 (read only): zstd-compressed JSON, chunk refs as
``[sha256_hex, pack_id | null, offset, length, raw]``. Both hold every file in memory, as
their writers did; their chunk size is every file's block.

A block table's columns are encoded and decoded in :mod:`dbops.repo.mtable`.

:func:`read_entries` is the one reader of a stored manifest's entries; every entry passes
:func:`check_entry` on its way out.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from typing import Any, BinaryIO

import zstandard

from dbops.errors import ValidationError
from dbops.repo.model import DIR, FILE, PAGE, SYMLINK, ChunkRef, FileEntry
from dbops.repo.mtable import BASE_HASH, blocks_of, decode_table, encode_table, raw_lengths

MAGIC2 = b"DBOPSMF2"
MAGIC3 = b"DBOPSMF3"
MAGIC4 = b"DBOPSMF4"
MAGIC5 = b"DBOPSMF5"
MAGICS = {MAGIC3: 3, MAGIC4: 4, MAGIC5: 5}
WRITERS = {3: MAGIC3, 4: MAGIC4, 5: MAGIC5}
NO_PACK = 0xFFFFFFFF
TYPES = (FILE, DIR, SYMLINK)

_LEN = struct.Struct("<I")


def check_entry(e: FileEntry, what: str) -> FileEntry:
    """Every entry read from storage passes here (all formats, via ``Manifest.entries``): the one
    place to validate what the bucket says about a file. Checks its type and that its blocks cover
    exactly its size."""
    if e.type not in TYPES:
        raise ValidationError(f"{what}: entry {e.path!r} has an unknown type {e.type!r}")
    if e.type != FILE:
        if e.chunks:
            raise ValidationError(f"{what}: entry {e.path} is a {e.type} but lists content")
        return e
    if e.block <= 0 or e.block % 8192:
        raise ValidationError(f"{what}: entry {e.path} has an invalid block size {e.block}")
    expected = blocks_of(e.size, e.block)
    total = sum(c.raw for c in e.chunks)
    if len(e.chunks) != expected or total != e.size or any(c.raw != e.block for c in e.chunks[:-1]):
        raise ValidationError(
            f"{what}: manifest entry for {e.path} is inconsistent",
            detail=f"size {e.size}, {len(e.chunks)} blocks covering {total} bytes (block size {e.block})",
        )
    for n, c in enumerate(e.chunks):
        if c.mask or c.base is not None or c.on_base:
            why = _delta_problem(c)
            if why:
                raise ValidationError(f"{what}: manifest entry for {e.path} has a bad page delta",
                                      detail=f"block {n}: {why}")
    return e


def _delta_problem(c: ChunkRef) -> str:
    """Why a page-delta ref cannot be applied to its block ("" when it can)."""
    b = c.base
    if not c.mask or b is None or c.pack is None:
        return "a delta needs a mask, a base and a stored frame"
    if c.raw % PAGE or c.mask >> (c.raw // PAGE):
        return f"mask {c.mask:#x} names pages beyond the block's {c.raw // PAGE}"
    if c.at + c.stored_raw > c.frame_raw:
        return f"its {c.stored_raw} bytes of pages do not fit its frame of {c.frame_raw} bytes at {c.at}"
    if b.mask or b.base is not None or b.pack is None or len(b.hash) not in (2 * BASE_HASH, 64):
        return "its base is not a stored whole block"
    if b.raw != c.raw or b.at + b.raw > b.frame_raw:
        return f"its base does not hold a block of {c.raw} bytes (base {b.raw} bytes at {b.at} of {b.frame_raw})"
    if c.on_base and (c.at or c.frame_raw != c.stored_raw):
        return (f"a delta compressed against its base must be its frame's only content "
                f"({c.stored_raw} bytes at {c.at} of a frame of {c.frame_raw} bytes)")
    return ""


# ---------------------------------------------------------------------- entry <-> JSON


def entry_meta(f: FileEntry) -> dict[str, Any]:
    d: dict[str, Any] = {"path": f.path, "type": f.type, "mode": f.mode, "mtime_ns": f.mtime_ns}
    if f.type == FILE:
        d["size"] = f.size
        d["block"] = f.block
    elif f.type == SYMLINK:
        d["target"] = f.target
    return d


def entry_from_meta(d: dict[str, Any], chunks: tuple[ChunkRef, ...] = (), block: int = 0) -> FileEntry:
    return FileEntry(path=str(d["path"]), type=str(d["type"]), mode=int(d["mode"]), mtime_ns=int(d["mtime_ns"]),
                     size=int(d.get("size", 0)), target=d.get("target"), chunks=chunks,
                     block=int(d.get("block", block)) if d["type"] == FILE else 0)


# ---------------------------------------------------------------------- formats 3 to 5: writer


class Writer:
    """Streams entries into a local file; :meth:`finish` prepends the header and returns the path.

    Keeps the pack id table (one id per pack: small) and totals; never the entries."""

    def __init__(self, path: str, fmt: int = 5):
        if fmt not in WRITERS:
            raise ValueError(f"cannot write manifest format {fmt}")
        self.path, self.format = path, fmt
        self._body_path = path + ".entries"
        self._body = open(self._body_path, "wb")
        self._z = zstandard.ZstdCompressor(level=3).stream_writer(self._body, closefd=False)
        self.packs: dict[str, int] = {}
        self.entries = 0
        self.referenced_bytes = 0

    def _number(self, pack: str | None) -> int:
        if pack is None:
            return NO_PACK
        n = self.packs.get(pack)
        if n is None:
            n = self.packs[pack] = len(self.packs)
        return n

    def add(self, e: FileEntry) -> None:
        meta = json.dumps(entry_meta(e), separators=(",", ":")).encode()
        table = encode_table(e.chunks, self._number, self.format) if e.chunks else b""
        self._z.write(_LEN.pack(4 + len(meta) + len(table)) + _LEN.pack(len(meta)) + meta + table)
        frames = {(c.pack, c.offset): c.length for c in e.chunks if c.pack is not None}
        frames.update(((b.pack, b.offset), b.length) for c in e.chunks if (b := c.base) is not None and b.pack)
        self.referenced_bytes += sum(frames.values())
        self.entries += 1

    def finish(self, header: dict[str, Any]) -> str:
        self._z.flush(zstandard.FLUSH_FRAME)
        self._z.close()
        self._body.close()
        head = zstandard.ZstdCompressor(level=9).compress(json.dumps(header, separators=(",", ":")).encode())
        with open(self.path, "wb") as out, open(self._body_path, "rb") as body:
            out.write(WRITERS[self.format] + _LEN.pack(len(head)) + head)
            while block := body.read(1 << 20):
                out.write(block)
        os.unlink(self._body_path)
        return self.path

    def abort(self) -> None:
        try:
            self._z.close()
        except (zstandard.ZstdError, ValueError, OSError):
            pass
        self._body.close()
        for p in (self._body_path, self.path):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


# ---------------------------------------------------------------------- reading


def read_header(f: BinaryIO) -> tuple[int, dict[str, Any], int]:
    """(format, header document, offset of the entry stream) of a stored manifest.
    Formats 1 and 2: the whole document, entries included."""
    magic = f.read(len(MAGIC3))
    dz = zstandard.ZstdDecompressor()
    if magic != MAGIC2 and magic not in MAGICS:  # format 1: one zstd-compressed JSON document
        f.seek(0)
        with dz.stream_reader(f, read_across_frames=True) as r:
            return 1, json.loads(r.read()), -1
    (n,) = _LEN.unpack(f.read(4))
    head = f.read(n)
    if len(head) != n:
        raise ValueError("manifest header is truncated")
    doc = json.loads(dz.decompress(head))
    if magic == MAGIC2:
        table = dz.decompressobj().decompress(f.read())
        doc["files"] = old_files_from_table(doc, table)
        return 2, doc, -1
    return MAGICS[magic], doc, len(MAGIC3) + 4 + n


def old_files_from_table(doc: dict[str, Any], table: bytes) -> list[FileEntry]:
    """Format 2's files with their chunks (one table for all files)."""
    cs = int(doc["chunk_size"])
    files = [entry_from_meta(d, block=cs) for d in doc["files"]]
    raws: list[int] = []
    counts = []
    for f in files:
        r = raw_lengths(f.size, cs) if f.type == FILE else []
        raws.extend(r)
        counts.append(len(r))
    names = dict(enumerate(doc["packs"]))
    names[NO_PACK] = None
    refs = decode_table(table, raws, names.__getitem__)
    out, i = [], 0
    for f, k in zip(files, counts, strict=True):
        out.append(FileEntry(f.path, f.type, f.mode, f.mtime_ns, f.size, f.target, tuple(refs[i:i + k]), cs)
                   if k else f)
        i += k
    return out


def old_files_from_json(doc: dict[str, Any]) -> list[FileEntry]:
    """Format 1's files: chunk refs inline, one frame per chunk."""
    cs = int(doc["chunk_size"])
    return [entry_from_meta(d, tuple(ChunkRef(h, p, int(o), int(n), int(r), 0, int(r) if p else 0)
                                     for h, p, o, n, r in d.get("chunks", ())), block=cs)
            for d in doc["files"]]


def _read_exact(r: Any, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        b = r.read(n - got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def read_entries(path: str, offset: int, packs: list[str], count: int, what: str, fmt: int = 3, *,
                 tables: bool = True) -> Iterator[FileEntry]:
    """Every entry of a format 3, 4 or 5 manifest stored at path (entry stream at offset), one at a time,
    each checked by :func:`check_entry`; ``count`` of them. Raises ValidationError when the
    stream is damaged or ends early. ``tables=False``: files come without their blocks (their
    block tables are skipped, not decoded, and only their type is checked): a listing."""
    names: dict[int, str | None] = dict(enumerate(packs))
    names[NO_PACK] = None

    def pack_name(n: int) -> str | None:
        try:
            return names[n]
        except KeyError:
            raise ValueError(f"pack number {n} is not in the pack table") from None

    try:
        with open(path, "rb") as f:
            f.seek(offset)
            with zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True) as r:
                seen = 0
                while True:
                    head = _read_exact(r, 4)
                    if not head:
                        if seen != count:
                            raise ValueError(f"entry stream ends after {seen} of {count} entries")
                        return
                    seen += 1
                    (n,) = _LEN.unpack(head)
                    rec = _read_exact(r, n)
                    if len(rec) != n:
                        raise ValueError("entry record is truncated")
                    (m,) = _LEN.unpack_from(rec, 0)
                    d = json.loads(rec[4:4 + m])
                    e = entry_from_meta(d)
                    if not tables:
                        if e.type != FILE and len(rec) != 4 + m:
                            raise ValueError(f"entry {e.path} carries a block table it cannot have")
                        yield e if e.type == FILE else check_entry(e, what)
                        continue
                    if e.type == FILE and e.size:
                        e = e.with_chunks(tuple(decode_table(memoryview(rec)[4 + m:],
                                                             raw_lengths(e.size, e.block), pack_name, fmt)))
                    elif len(rec) != 4 + m:
                        raise ValueError(f"entry {e.path} carries a block table it cannot have")
                    yield check_entry(e, what)
    except ValidationError:
        raise
    except (zstandard.ZstdError, ValueError, KeyError, TypeError, struct.error) as e:
        raise ValidationError(f"{what} is unreadable: {type(e).__name__}: {e}") from None
