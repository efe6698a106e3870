"""A manifest's listing kept compact for the passes of one restore (:meth:`Manifest.kept_listing`).

A restore walks the manifest's entries once per pass: folders and files created, content, WAL
marked archived, unlogged relations reset, empty files finished, links, folders finished. Each walk
of a stored manifest decompresses the entry stream, parses each entry's JSON and checks it as
untrusted input again (some 20 µs a file, nine times over). :class:`Listed` keeps, for the time of
one restore, what the passes other than the content's read: each entry's path, type, mode, time,
size and block size, as columns (the paths' bytes in one buffer, the rest in arrays; a link's
target in a small dict: links are few), about 35 bytes a file plus its path's, no object per entry.
It is filled from :meth:`Manifest.listing` (every entry checked by the path guard on the way in,
in walk order), and an entry is made again when asked for.

Entries come in walk order, their path keys strictly increasing (the guard refuses anything else),
so :meth:`Listed.contains` is a binary search.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator
from itertools import islice

from dbops.errors import ValidationError
from dbops.repo.model import DIR, FILE, SYMLINK, FileEntry, path_key

_TYPES = (FILE, DIR, SYMLINK)
_CODE = {t: i for i, t in enumerate(_TYPES)}


def _enc(s: str) -> bytes:
    return s.encode("utf-8", "surrogatepass")  # any str back exactly, lone surrogates included


def _dec(b: bytes | bytearray) -> str:
    return b.decode("utf-8", "surrogatepass")


def _unfit(e: FileEntry) -> str:
    """Why the entry's fields do not fit the columns ("" when they do)."""
    if e.type not in _CODE or not isinstance(e.path, str) or (e.target is not None and not isinstance(e.target, str)):
        return "not an entry"
    for name, v, lo, hi in (("mode", e.mode, 0, 0xFFFF), ("mtime_ns", e.mtime_ns, -(1 << 63), (1 << 63) - 1),
                            ("size", e.size, 0, (1 << 64) - 1), ("block", e.block, 0, 0xFFFFFFFF)):
        if not isinstance(v, int) or not lo <= v <= hi:
            return f"{name} {v!r} out of range"
    return ""


class Listed:
    """Entries without their blocks, compact, in walk order (see the module)."""

    def __init__(self, entries: Iterable[FileEntry], what: str = "manifest") -> None:
        self._paths, self._ends = bytearray(), array("Q", [0])
        self._type, self._mode, self._block = array("B"), array("H"), array("I")
        self._mtime, self._size = array("q"), array("Q")
        self._targets: dict[int, str] = {}
        for e in entries:
            why = _unfit(e)
            if why:  # nothing the path guard and the block check let by; refused all the same
                raise ValidationError(f"{what}: entry {e.path!r} cannot be listed: {why}")
            if e.target is not None:
                self._targets[len(self._type)] = e.target
            self._paths += _enc(e.path)
            self._ends.append(len(self._paths))
            self._type.append(_CODE[e.type])
            self._mode.append(e.mode)
            self._mtime.append(e.mtime_ns)
            self._size.append(e.size)
            self._block.append(e.block)

    def __len__(self) -> int:
        return len(self._type)

    def nbytes(self) -> int:
        """The columns' bytes (their arrays' capacity aside)."""
        return (len(self._paths) + sum(a.itemsize * len(a) for a in (self._ends, self._type, self._mode,
                                                                    self._block, self._mtime, self._size)))

    def __iter__(self) -> Iterator[FileEntry]:
        paths, targets = self._paths, self._targets
        ends = self._ends
        for i, (a, b, t, mode, mtime, size, block) in enumerate(zip(
                ends, islice(ends, 1, None), self._type, self._mode, self._mtime, self._size, self._block)):
            yield FileEntry(_dec(paths[a:b]), _TYPES[t], mode, mtime, size, targets.get(i), (), block)

    def _path(self, i: int) -> str:
        return _dec(self._paths[self._ends[i]:self._ends[i + 1]])

    def contains(self, path: str) -> bool:
        """Whether an entry has this path (binary search: the keys are in walk order)."""
        key = path_key(path)
        lo, hi = 0, len(self)
        while lo < hi:
            mid = (lo + hi) // 2
            k = path_key(self._path(mid))
            if k == key:
                return True
            if k < key:
                lo = mid + 1
            else:
                hi = mid
        return False
