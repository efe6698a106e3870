"""Opening one stored frame: decompressed and checked for length (a page delta compressed
against its base: with that base block's bytes). The caller checks each block's sha256."""

from __future__ import annotations

import zstandard

from dbops.repo import codec
from dbops.repo.blocks import pages_view
from dbops.repo.model import ChunkRef


def open_frame(decoder: codec.Decoder, r: ChunkRef, stored: bytes | memoryview) -> tuple[memoryview | None, str]:
    """(the frame's raw content, "") when it reads back, else (None, why)."""
    if len(stored) != r.length:
        return None, f"object too short: frame at offset {r.offset} has {len(stored)} of {r.length} bytes"
    try:
        raw = decoder.decode(stored, r.frame_raw)
    except zstandard.ZstdError as e:
        return None, f"frame at offset {r.offset} does not decompress: {e}"
    if len(raw) != r.frame_raw:
        return None, f"frame at offset {r.offset} decompresses to {len(raw)} of {r.frame_raw} bytes"
    return memoryview(raw), ""


def open_delta(decoder: codec.Decoder, r: ChunkRef, stored: bytes | memoryview,
               base: bytes | memoryview | None) -> tuple[memoryview | None, str]:
    """(a format 5 delta's pages, "") decoded with its base block's bytes (the dictionary: the
    base's pages the delta replaces, :func:`dbops.repo.blocks.pages_view`), else (None, why). The
    one place a delta compressed against its base is decoded; the caller checks the pages' sha256."""
    if base is None or len(base) != (r.base.raw if r.base is not None else -1):
        return None, f"the base block of the page delta at offset {r.offset} is not available"
    if len(stored) != r.length:
        return None, f"object too short: frame at offset {r.offset} has {len(stored)} of {r.length} bytes"
    try:
        raw = decoder.decode_on(stored, r.frame_raw, pages_view(base, r.mask))
    except zstandard.ZstdError as e:
        return None, f"page delta at offset {r.offset} does not decompress against its base: {e}"
    if len(raw) != r.frame_raw:
        return None, f"page delta at offset {r.offset} decompresses to {len(raw)} of {r.frame_raw} bytes"
    return memoryview(raw), ""


def chunk_fault(raw: bytes | memoryview, c: ChunkRef, frame_offset: int) -> str:
    """"" when the chunk at ``c.at`` of a frame's raw content matches its sha256 (a delta's base
    carries the first 128 bits of it), else why not."""
    if len(c.hash) < 32 or codec.sha256(raw[c.at:c.at + c.raw])[:len(c.hash)] != c.hash:
        return (f"chunk at offset {c.at} of the frame at offset {frame_offset} fails its sha256 check "
                f"(expected {c.hash[:16]}...)")
    return ""
