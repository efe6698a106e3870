"""Pages of a freshly restored data folder, copied aside before a server runs on it: the local
bases of the next incremental's page deltas.

`dbops backup` builds an incremental from the previous backup restored into scratch (every block
checked against its hash by the download) and then replayed by a throwaway server. A page delta
of that incremental is compressed against its base block's pages (format 5, see
:mod:`dbops.repo.bases`); where the parent's ref of the block is a whole block, that base is
exactly what the download wrote there, so the pages replay is about to change can be copied out
of the folder before the server starts (:class:`Saver`, each file's pages as soon as the download
wrote it and the pages are known), and the store takes them from here instead of fetching the base
back from storage (:meth:`SavedPages.pages`).

Memory: only the index, per file its saved page numbers and their offsets in the side file in
arrays (12 bytes a page: at most about 3 MiB, see :data:`dbops.ops.backup.basesave.MAX_PAGES`);
the pages are on disk and read back with ``pread`` (never mapped: touched pages of a mapping would
count in the RSS).
"""

from __future__ import annotations

import errno
import os
import re
import threading
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from dbops.filecopy import copy_range
from dbops.repo.blocks import pages_of
from dbops.repo.model import PAGE

COPY_RUN = 128  # pages copied at once at most (1 MiB)

# One file's saved pages: their numbers (sorted) and, at the same places, their offsets in the side file.
FileIndex = tuple[array, array]


def file_index(offsets: Mapping[int, int]) -> FileIndex:
    """The compact index of {page number: offset in the side file}."""
    numbers = sorted(offsets)
    return array("I", numbers), array("Q", (offsets[n] for n in numbers))


def offsets_of(fi: FileIndex) -> Iterator[tuple[int, int]]:
    """(page number, offset in the side file) of each page of a file's index, in page order."""
    return zip(fi[0], fi[1])


class SavedPages:
    """The side file and its index: {real path of a file: its :data:`FileIndex`}.
    ``pages()`` is thread-safe and counts what it found (``hits``) and what it did not (``misses``)."""

    def __init__(self, path: str, index: dict[str, FileIndex]):
        self.path, self.index = path, index
        self.fd = os.open(path, os.O_RDONLY)
        self.lock = threading.Lock()
        self.hits = self.misses = self.hit_pages = 0

    @property
    def saved(self) -> int:
        return sum(len(v[0]) for v in self.index.values())

    def key(self, path: str) -> str | None:
        """The index's key for a file the store reads (its real path), None when nothing of it is saved."""
        real = os.path.realpath(path)
        return real if real in self.index else None

    def pages(self, key: str | None, first: int, mask: int) -> bytes | None:
        """The saved pages ``first + i`` for each page i set in ``mask``, concatenated (a delta's
        base pages, as :func:`dbops.repo.blocks.same_pages` cuts them); None unless every one is saved."""
        own = self.index.get(key) if key is not None else None
        offsets = [_offset(own, first + p) for p in pages_of(mask)] if own is not None else [None]
        if None in offsets:
            self.missed()
            return None
        out = bytearray()
        k = 0
        while k < len(offsets):  # consecutive offsets read at once
            j = k
            while j + 1 < len(offsets) and offsets[j + 1] == offsets[j] + PAGE:  # type: ignore[operator]
                j += 1
            want = (j - k + 1) * PAGE
            try:
                got = os.pread(self.fd, want, offsets[k])  # type: ignore[arg-type]
            except OSError:
                got = b""
            if len(got) != want:  # the side file cannot give them: the base is fetched instead
                self.missed()
                return None
            out += got
            k = j + 1
        self.found(len(offsets))
        return bytes(out)

    def found(self, pages: int) -> None:
        """Count a delta's base found saved (``pages`` of them), from any thread."""
        with self.lock:
            self.hits += 1
            self.hit_pages += pages

    def missed(self) -> None:
        """Count a delta's base not found saved (it is fetched instead), from any thread."""
        with self.lock:
            self.misses += 1

    def span(self, key: str | None, first: int, count: int) -> Span | None:
        """The saved pages of file ``key`` among its pages ``first`` to ``first + count - 1``, read
        with one ``pread`` (a store reads a file 4 MiB at a time: one read for its deltas' bases
        there instead of one a delta, each a wait for the GIL when other threads hold it). None when
        none is saved there or they are not one run of the side file (as :class:`Saver` writes a
        file's pages, in page order): :meth:`pages` then reads each delta's."""
        own = self.index.get(key) if key is not None else None
        if own is None:
            return None
        numbers, offsets = own
        lo, hi = bisect_left(numbers, first), bisect_left(numbers, first + count)
        if lo == hi:
            return None
        at = min(offsets[lo:hi])
        size = (hi - lo) * PAGE
        if max(offsets[lo:hi]) + PAGE - at != size:  # not one run (offsets are distinct multiples of PAGE)
            return None
        try:
            data = os.pread(self.fd, size, at)
        except OSError:
            return None
        if len(data) != size:
            return None
        return Span(self, numbers, offsets, lo, hi, at, data)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Span:
    """Saved pages of one file read at once (:meth:`SavedPages.span`); ``pages()`` as
    :meth:`SavedPages.pages` for the pages in the span, counting in the same counters."""

    def __init__(self, saved: SavedPages, numbers: array, offsets: array, lo: int, hi: int, at: int, data: bytes):
        self.saved, self.numbers, self.offsets, self.lo, self.hi = saved, numbers, offsets, lo, hi
        self.at, self.data = at, memoryview(data)

    def pages(self, first: int, mask: int) -> bytes | None:
        """The saved pages ``first + i`` for each page i set in ``mask``, concatenated; None unless
        every one is in the span."""
        numbers, out = self.numbers, []
        for p in pages_of(mask):
            i = bisect_left(numbers, first + p, self.lo, self.hi)
            if i == self.hi or numbers[i] != first + p:
                self.saved.missed()
                return None
            k = self.offsets[i] - self.at
            out.append(self.data[k:k + PAGE])
        self.saved.found(len(out))
        return b"".join(out)


def _offset(fi: FileIndex, page: int) -> int | None:
    numbers, offsets = fi
    i = bisect_left(numbers, page)
    return offsets[i] if i < len(numbers) and numbers[i] == page else None


def _runs(numbers: list[int]) -> Iterable[tuple[int, int]]:
    """(first, count) of each run of consecutive numbers (sorted), at most COPY_RUN long."""
    k = 0
    while k < len(numbers):
        j = k
        while j + 1 < len(numbers) and numbers[j + 1] == numbers[j] + 1 and j + 1 - k < COPY_RUN:
            j += 1
        yield numbers[k], j - k + 1
        k = j + 1


class Saver:
    """Builds the side file while a restore writes the folder ``root``: ``file_done(path)`` (relative,
    from the restore's threads) once a file's content is written for good, ``predicted(wanted)``
    ({:func:`segment_key`: page numbers}, once known) and, after the restore returned and before
    anything else writes to the folder, ``finish()``. The pages of a file are copied once both are
    known, by whichever of the two calls comes second; never an error for the restore: a failure
    leaves ``finish()`` returning None (``problem`` says why). ``limit``: the most bytes the side
    file may take; a file whose pages would go beyond it is left out (its bases fetched)."""

    def __init__(self, root: Path, path: str, limit: int | None = None):
        self.root, self.path, self.limit = root, path, limit
        self.out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.lock = threading.Lock()
        self.wanted: Mapping[SegmentKey, Iterable[int]] | None = None
        # relation files written before the prediction came: their paths, each ended by a NUL (a few
        # bytes a file, not a Python object each: with many relations, most are written before it)
        self.done = bytearray()
        self.index: dict[str, FileIndex] = {}
        self.size = 0
        self.problem: str | None = None

    def file_done(self, rel: str) -> None:
        key = segment_key(rel)
        if key is None:
            return
        with self.lock:
            if self.wanted is None:
                self.done += rel.encode("utf-8", "surrogateescape") + b"\0"
                return
            pages = self.wanted.get(key)
        if pages:
            self._copy(rel, pages)

    def predicted(self, wanted: Mapping[SegmentKey, Iterable[int]]) -> None:
        with self.lock:
            self.wanted = wanted
            done, self.done = self.done, bytearray()
        start = 0
        while (end := done.find(b"\0", start)) >= 0:  # one path at a time
            rel = done[start:end].decode("utf-8", "surrogateescape")
            start = end + 1
            key = segment_key(rel)
            if key in wanted:
                self._copy(rel, wanted[key])

    def finish(self) -> SavedPages | None:
        """Close the side file (every file is written now); the saved pages."""
        self.close()
        self.wanted, self.done = None, bytearray()  # the prediction is not needed any more
        if self.problem is not None:
            return None
        return SavedPages(self.path, {k: v for k, v in self.index.items() if len(v[0])})

    def close(self) -> None:
        """Close the side file (finish() does; after a failed restore, this alone)."""
        if self.out >= 0:
            os.close(self.out)
            self.out = -1

    def _copy(self, rel: str, pages: Iterable[int]) -> None:
        """The wanted pages of one file that is written for good (any thread)."""
        if self.problem is not None:
            return
        try:
            real = os.path.realpath(self.root / rel)
            try:
                src = os.open(real, os.O_RDONLY)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return
            try:
                npages = os.fstat(src).st_size // PAGE
                numbers = sorted(p for p in set(pages) if 0 <= p < npages)
                with self.lock:
                    at = self.size
                    if self.limit is not None and at + len(numbers) * PAGE > self.limit:
                        return
                    self.size += len(numbers) * PAGE
                own: dict[int, int] = {}
                for first, count in _runs(numbers):
                    n = copy_range(src, self.out, first * PAGE, at, count * PAGE)
                    if n != count * PAGE:
                        raise OSError(errno.EIO, f"short copy of saved pages ({n} of {count * PAGE} bytes)")
                    for k in range(count):
                        own[first + k] = at + k * PAGE
                    at += count * PAGE
            finally:
                os.close(src)
            with self.lock:
                if real in self.index:  # not expected (a file is finished once): merged all the same
                    own = {**dict(offsets_of(self.index[real])), **own}
                self.index[real] = file_index(own)
        except Exception as e:  # noqa: BLE001  never the restore's failure: the store fetches instead
            self.problem = f"{rel}: {e}"


# (tablespace OID, database OID, relfilenode, segment number) of a main-fork segment file, as
# pg_waldump names a relation (1663 pg_default: base/DB; 1664 pg_global: global, database 0).
SegmentKey = tuple[int, int, int, int]
_SEGMENT_RE = re.compile(r"^(?:base/(\d+)|global|pg_tblspc/(\d+)/PG_[^/]+/(\d+))/(\d+)(?:\.(\d+))?$")


def segment_key(path: str) -> SegmentKey | None:
    """The relation segment a data folder's path holds (None for any other file)."""
    m = _SEGMENT_RE.match(path)
    if m is None:
        return None
    base_db, spc, spc_db, rel, seg = m.groups()
    if base_db is not None:
        return 1663, int(base_db), int(rel), int(seg or 0)
    if spc is not None:
        return int(spc), int(spc_db), int(rel), int(seg or 0)
    return 1664, 0, int(rel), int(seg or 0)
