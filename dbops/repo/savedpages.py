"""Pages of a freshly restored data folder, copied aside before a server runs on it: the local
bases of the next incremental's page deltas.

`dbops backup` builds an incremental from the previous backup restored into scratch (every block
checked against its hash by the download) and then replayed by a throwaway server. A page delta
of that incremental is compressed against its base block's pages (format 5, see
:mod:`dbops.repo.bases`); where the parent's ref of the block is a whole block, that base is
exactly what the download wrote there, so the pages replay is about to change can be copied out
of the folder before the server starts (:meth:`SavedPages.save`), and the store takes them from
here instead of fetching the base back from storage (:meth:`SavedPages.pages`).

Memory: only the index (file, page number) -> offset in the side file; the pages are on disk and
read back with ``pread`` (never mapped: touched pages of a mapping would count in the RSS).
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterable, Mapping

from dbops.repo.blocks import pages_of
from dbops.repo.model import PAGE

COPY_RUN = 128  # pages copied at once at most (1 MiB)


class SavedPages:
    """The side file and its index: {real path of a file: {page number: offset in the side file}}.
    ``pages()`` is thread-safe and counts what it found (``hits``) and what it did not (``misses``)."""

    def __init__(self, path: str, index: dict[str, dict[int, int]]):
        self.path, self.index = path, index
        self.fd = os.open(path, os.O_RDONLY)
        self.lock = threading.Lock()
        self.hits = self.misses = 0

    @property
    def saved(self) -> int:
        return sum(len(v) for v in self.index.values())

    @classmethod
    def save(cls, wanted: Mapping[str, Iterable[int]], path: str) -> SavedPages:
        """Copy the wanted pages ({file path: page numbers}) into a new side file at ``path``. A file
        that is missing, or pages beyond its end, are left out (the store then fetches those bases).
        Call it only on a folder that is exactly a backup just restored (checked) and before any
        server ran on it: what is saved stands for that backup's blocks."""
        index: dict[str, dict[int, int]] = {}
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        at = 0
        try:
            for name in sorted(wanted):
                real = os.path.realpath(name)
                try:
                    src = os.open(real, os.O_RDONLY)
                except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                    continue
                try:
                    npages = os.fstat(src).st_size // PAGE
                    numbers = sorted(p for p in set(wanted[name]) if 0 <= p < npages)
                    own = index.setdefault(real, {})
                    for first, count in _runs(numbers):
                        _copy(src, out, first * PAGE, at, count * PAGE)
                        for k in range(count):
                            own[first + k] = at + k * PAGE
                        at += count * PAGE
                finally:
                    os.close(src)
        finally:
            os.close(out)
        return cls(path, {k: v for k, v in index.items() if v})

    def key(self, path: str) -> str | None:
        """The index's key for a file the store reads (its real path), None when nothing of it is saved."""
        real = os.path.realpath(path)
        return real if real in self.index else None

    def pages(self, key: str | None, first: int, mask: int) -> bytes | None:
        """The saved pages ``first + i`` for each page i set in ``mask``, concatenated (a delta's
        base pages, as :func:`dbops.repo.blocks.same_pages` cuts them); None unless every one is saved."""
        own = self.index.get(key) if key is not None else None
        offsets = [own.get(first + p) for p in pages_of(mask)] if own is not None else [None]
        if None in offsets:
            with self.lock:
                self.misses += 1
            return None
        out = bytearray()
        k = 0
        while k < len(offsets):  # consecutive offsets read at once
            j = k
            while j + 1 < len(offsets) and offsets[j + 1] == offsets[j] + PAGE:  # type: ignore[operator]
                j += 1
            want = (j - k + 1) * PAGE
            got = os.pread(self.fd, want, offsets[k])  # type: ignore[arg-type]
            if len(got) != want:
                raise OSError(errno.EIO, f"{self.path}: short read of saved pages")
            out += got
            k = j + 1
        with self.lock:
            self.hits += 1
        return bytes(out)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _runs(numbers: list[int]) -> Iterable[tuple[int, int]]:
    """(first, count) of each run of consecutive numbers (sorted), at most COPY_RUN long."""
    k = 0
    while k < len(numbers):
        j = k
        while j + 1 < len(numbers) and numbers[j + 1] == numbers[j] + 1 and j + 1 - k < COPY_RUN:
            j += 1
        yield numbers[k], j - k + 1
        k = j + 1


def _copy(src: int, dst: int, src_at: int, dst_at: int, n: int) -> None:
    """n bytes from src at src_at to dst at dst_at (in the kernel where it can)."""
    done = 0
    while done < n:
        try:
            got = os.copy_file_range(src, dst, n - done, src_at + done, dst_at + done)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            got = 0
            data = os.pread(src, n - done, src_at + done)
            if data:
                got = os.pwrite(dst, data, dst_at + done)
        if got <= 0:
            raise OSError(errno.EIO, f"short copy of saved pages ({done} of {n} bytes)")
        done += got
