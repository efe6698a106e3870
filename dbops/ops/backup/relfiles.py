"""A set of relation files named by their paths in the data folder (``base/5/16384``,
``pg_tblspc/16400/PG_15_202209061/5/16401``, as ``pg_relation_filepath`` gives them), held as a
sorted array of 4-byte file numbers per folder: about 4 bytes a file where a set of path strings
takes about 100. The checks add every heap table they read in full (a million tables: 4 MB, not
100 MB); ``pg_checksums``' shadow folder asks about each file it meets."""

from __future__ import annotations

from array import array
from bisect import bisect_left
from typing import Iterable


class RelFiles:
    def __init__(self, paths: Iterable[str] = ()) -> None:
        self._by_dir: dict[str, array] = {}
        self._unsorted: set[str] = set()  # folders appended to since they were last sorted
        self._other: set[str] = set()  # a path whose last part is not a 32-bit file number (kept as is)
        self.update(paths)

    def add(self, path: str) -> None:
        folder, _, name = path.rpartition("/")
        if not (name.isascii() and name.isdigit() and len(name) <= 10 and int(name) < 2 ** 32):
            self._other.add(path)
            return
        self._by_dir.setdefault(folder, array("I")).append(int(name))  # sorted (and deduplicated) when asked
        self._unsorted.add(folder)

    def update(self, paths: Iterable[str]) -> None:
        for p in paths:
            self.add(p)

    def __contains__(self, path: object) -> bool:
        if not isinstance(path, str):
            return False
        folder, _, name = path.rpartition("/")
        nums = self._by_dir.get(folder)
        if nums is None or not (name.isascii() and name.isdigit() and len(name) <= 10):
            return path in self._other
        if folder in self._unsorted:
            nums = self._sort(folder)
        n = int(name)
        i = bisect_left(nums, n)
        return i < len(nums) and nums[i] == n

    def _sort(self, folder: str) -> array:
        self._by_dir[folder] = nums = array("I", sorted(set(self._by_dir[folder])))
        self._unsorted.discard(folder)
        return nums

    def __len__(self) -> int:
        for folder in list(self._unsorted):
            self._sort(folder)
        return sum(len(v) for v in self._by_dir.values()) + len(self._other)

    def __bool__(self) -> bool:
        return bool(self._by_dir or self._other)
