"""A batch's page deltas held in memory, applied over their base blocks as those are written.

A restore reads a batch with page deltas (:mod:`dbops.repo.schedule`) either in two passes (its
whole blocks written, then its deltas written over them, a format 5 delta decoded with its base
read back from the file) or, when the batch's deltas are small (their stored frames at most
``HOLD_BYTES``: a pgbench incremental stores a few hundred bytes a delta), in one: the deltas'
stored frames are fetched first, held (:class:`Held`), and each is applied in memory to its base
block as the range holding that base is checked (:meth:`Held.over`), the block written once with
its new pages (one ``pwritev`` of the base's pieces and the delta's pages, nothing copied). That saves reading every base back, a write per run of pages, and the wait for a
batch's last whole block before its deltas start; the deltas are applied by every worker that
writes whole blocks, not by the one reading the batch's range of deltas.

Checks are those of the two passes: the base block against its sha256 (as every whole block),
then the delta decoded against it (:func:`dbops.repo.frames.open_delta`: one call into zstd) and
its pages against their sha256 (:func:`dbops.repo.frames.chunk_fault`); a damaged delta is named
by its file, before anything of its block is written.
"""

from __future__ import annotations

from collections.abc import Iterable

from dbops.repo import codec
from dbops.repo.blocks import delta_writes
from dbops.repo.frames import chunk_fault, open_delta
from dbops.repo.ranges import Frame, Range, Run, frame_chunks

HOLD_BYTES = 8 * 1024 * 1024  # stored bytes of one batch's deltas held at most (else: two passes)


def held_bytes(delta_ranges: Iterable[Range]) -> int:
    """The stored bytes the batch's deltas would hold (their frames, not the gaps between them)."""
    return sum(fr.ref.length for r in delta_ranges for fr in r.frames)


class Held:
    """The stored frames of one batch's page deltas, by the block they go over:
    {(file number in the batch, offset in the file): (the delta's frame and run, stored bytes, object key)}."""

    def __init__(self) -> None:
        self.by_block: dict[tuple[int, int], tuple[Frame, bytes | memoryview, str]] = {}
        self.stored = 0

    def add(self, fr: Frame, stored: bytes | memoryview, key: str) -> None:
        """Hold one stored frame of object ``key`` (as :func:`dbops.repo.ranges.frames_read` gives it)."""
        for run in fr.runs:  # a frame of one delta (format 5) as it is
            self.by_block[(run.file_no, run.offset)] = (fr if len(fr.runs) == 1 else Frame(fr.ref, [run]), stored, key)
        self.stored += len(stored)

    def over(self, decoder: codec.Decoder, run: Run, raw: memoryview) -> tuple[list[memoryview] | None, str]:
        """(the run's whole blocks with every held delta of theirs applied, as pieces to write one after
        the other, ""), (None, "") when no held delta goes over them, or, for a delta that does not
        decode or check, ([], why: its object, block and fault). ``raw``: the run's content, checked
        against its sha256; its pages a delta replaces are left out of the pieces (no copy of the run
        is made)."""
        pieces: list[memoryview] | None = None
        done = 0  # raw[:done] is in pieces
        for c in run.refs:
            at = c.at - run.at
            got = self.by_block.get((run.file_no, run.offset + at))
            if got is None:
                continue
            fr, stored, key = got
            drun = fr.runs[0]
            pages, why = _decoded(decoder, fr, stored, raw[at:at + c.raw])  # as checked: at most one delta a block
            if pages is None:
                return [], f"object {key}: the page delta of the block at offset {drun.offset}: {why}"
            if pieces is None:
                pieces = []
            for off, p in delta_writes(pages, drun.mask, c.raw):
                if at + off > done:
                    pieces.append(raw[done:at + off])
                pieces.append(p)
                done = at + off + len(p)
        if pieces is not None and done < len(raw):
            pieces.append(raw[done:])
        return pieces, ""


def _decoded(decoder: codec.Decoder, fr: Frame, stored: bytes | memoryview,
             base: memoryview) -> tuple[memoryview | None, str]:
    """(the pages of a held delta (a frame of one run), decoded against its base block and checked
    against their sha256, "") or (None, why). A format 5 delta (a frame of its own) straight through
    :func:`dbops.repo.frames.open_delta` and :func:`~dbops.repo.frames.chunk_fault`; a format 4 one
    (compressed on its own, maybe with others in its frame) through
    :func:`dbops.repo.ranges.frame_chunks`."""
    r, drun = fr.ref, fr.runs[0]
    if not r.on_base:
        (_run, pages, why), = frame_chunks(decoder, fr, stored)
        return pages, why
    content, why = open_delta(decoder, r, stored, base)
    if content is None:
        return None, why
    c = drun.refs[0]
    why = chunk_fault(content, c, r.offset)
    return (None, why) if why else (content[c.at:c.at + c.raw], "")
