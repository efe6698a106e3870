"""Files whose content is known, by identity: a store takes their refs without reading them.

A file's content is known at two moments of `dbops backup`: when the full backup's direct copy
has written the file's last range (the store that follows the copy read exactly that, see
:mod:`dbops.ops.backup.prestore`), and when the validation's download has finished it (every
block checked against the parent's hash: its content is the parent's entry for that path). At
that moment, after the writer's last write, :meth:`Known.record` notes the file's identity:
(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns). When the store of the stopped folder finds
the same identity (:meth:`Known.unchanged`), nothing wrote the file since: a write (``pwrite``,
``ftruncate``, a copy into it) sets mtime and ctime to the current time, and :meth:`Known.seal`
makes sure the clock has moved past every recorded time before any other writer (the throwaway
server) starts, so the same times cannot come back while the clock runs forward. ``utime`` can set
mtime back, never ctime; a renamed, replaced or re-created file has another inode or times.
The store then checks the clock again (:meth:`Known.usable`): a clock stepped back since the seal
makes every identity uncertain, and every file is read. The safety argument is in docs/backups.md.

Memory: a path kept as a 64-bit hash and five 8-byte numbers of identity a file, in arrays; once
sealed, the hashes sorted with their records (52 bytes a file in all, 60 at most while sealing),
never anything per block or page. The seal sorts in runs of ``RUN`` rows merged from arrays
(:func:`sorted_order`), so no Python object per file is held at once, whatever the number of files.
"""

from __future__ import annotations

import hashlib
import heapq
import os
import stat
import tempfile
import threading
import time
from array import array
from bisect import bisect_left
from itertools import islice, repeat
from operator import and_, eq, lshift, or_

PROBE_LIMIT = 2.0  # seconds to wait for the file clock to move on at a seal (one tick is a few ms)
RUN = 1 << 16  # rows a seal sorts at once as Python numbers (a few MiB), whatever the number of files


def path_hash(path: str) -> int:
    """A backup path as a 64-bit number (two paths sharing one are both forgotten: read)."""
    return int.from_bytes(hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big")


def identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What a write to a file changes: (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def clock_now(folder: str) -> int:
    """The file clock of folder's file system: the ctime of a file created there (then removed)."""
    fd, probe = tempfile.mkstemp(prefix=".dbops-clock-", dir=folder)
    try:
        return os.fstat(fd).st_ctime_ns
    finally:
        os.close(fd)
        os.unlink(probe)


def sorted_order(keys: array, run: int = RUN) -> array:
    """The indexes of ``keys`` (64-bit numbers, fewer than 2**32 of them) in key order, equal keys
    by index: what ``array("I", sorted(range(len(keys)), key=keys.__getitem__))`` gives, holding
    at most ``run`` of them as Python numbers at once: runs of ``run`` rows sorted alone into an
    array, then merged, each row taken as one number (its key above its index's 32 bits)."""
    n = len(keys)
    get = keys.__getitem__
    runs = array("I")
    for a in range(0, n, run):
        runs.extend(sorted(range(a, min(n, a + run)), key=get))
    if n <= run:
        return runs
    view = memoryview(runs)

    def rows(a: int):  # one sorted run, lazily: key << 32 | index
        idx = view[a:a + run]
        return map(or_, map(lshift, map(get, idx), repeat(32)), idx)

    return array("I", map(and_, heapq.merge(*(rows(a) for a in range(0, n, run))), repeat(0xFFFFFFFF)))


class Known:
    """The identities of files whose content is known, by their path in a backup. ``record`` from
    any thread while the writer finishes files; ``seal`` once, after the writer's last write and
    before anything else writes to the folder; then ``usable`` and ``unchanged`` (the store)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hashes = array("Q")  # each record's path hash, in record order (until the seal)
        self.cols = self._columns()  # each record's identity, in record order
        self.sorted, self.order = array("Q"), array("I")  # once sealed: the hashes sorted, their records
        self.latest = 0  # the newest time recorded
        self.sealed_at: int | None = None  # the file clock once past every recorded time
        self.folder: str | None = None
        self.sealed = False

    def __len__(self) -> int:
        return len(self.sorted)

    @staticmethod
    def _columns() -> tuple[array, ...]:
        return array("Q"), array("Q"), array("Q"), array("q"), array("q")  # dev, ino, size, mtime, ctime

    def record(self, path: str, real: str) -> None:
        """The file at ``real`` (its links followed) holds the known content of backup path ``path``,
        as of now; call it after the file's last write. Never raises (a file not recorded is read)."""
        try:
            st = os.stat(real)
        except OSError:
            return
        if not stat.S_ISREG(st.st_mode):
            return
        h, row = path_hash(path), identity(st)
        with self.lock:
            if self.sealed:
                return
            self.hashes.append(h)
            for col, v in zip(self.cols, row):
                col.append(v)
            self.latest = max(self.latest, st.st_mtime_ns, st.st_ctime_ns)

    def seal(self, folder: str) -> None:
        """No more records: sort them by path, and wait until the file clock of ``folder`` (the
        scratch folder, where the files are) is past every recorded time, so any later write gives a
        file a newer mtime and ctime. Call it before anything but the recording writer writes to
        the files. When the clock does not move on (or the folder takes no file), nothing is kept."""
        with self.lock:
            self.sealed = True
            hashes, self.hashes = self.hashes, array("Q")
            order = sorted_order(hashes, RUN)
            keys = array("Q", map(hashes.__getitem__, order))
            del hashes
            if any(map(eq, keys, islice(keys, 1, None))):  # two paths, one hash (not expected): both read
                dup = {h for h, g in zip(keys, islice(keys, 1, None)) if h == g}
                order = array("I", (i for i, h in zip(order, keys) if h not in dup))
                keys = array("Q", (h for h in keys if h not in dup))
            self.sorted, self.order = keys, order
        self.folder = folder
        deadline = time.monotonic() + PROBE_LIMIT
        try:
            while True:
                now = clock_now(folder)
                if now > self.latest:
                    self.sealed_at = now
                    return
                if time.monotonic() > deadline:
                    break
                time.sleep(0.001)
        except OSError:
            pass
        self.forget()

    def forget(self) -> None:
        self.hashes, self.cols = array("Q"), self._columns()
        self.sorted, self.order = array("Q"), array("I")
        self.sealed_at = None

    def usable(self) -> bool:
        """Once the writers are done (the store): False, forgetting every record, unless sealed and
        the file clock is still past the seal (a clock stepped back makes every identity uncertain)."""
        if self.sealed_at is None or self.folder is None or not len(self):
            return False
        try:
            now = clock_now(self.folder)
        except OSError:
            now = None
        if now is None or now < self.sealed_at:
            self.forget()
            return False
        return True

    def linked(self, path: str, before: os.stat_result, after: os.stat_result) -> None:
        """A hard link to the file of backup path ``path`` was made (its stat ``before`` and
        ``after`` the link, which changes its ctime and link count only): its record follows, if
        it was the file recorded. Only where nothing writes the files any more (the stopped copy,
        read by pg_checksums' shadow folder: dbops.ops.backup.shadow)."""
        i = self._row(path)
        if i is None:
            return
        with self.lock:
            if identity(before) == self._identity(i) and identity(after)[:4] == identity(before)[:4]:
                self.cols[4][i] = after.st_ctime_ns

    def unchanged(self, path: str, real: str, size: int) -> bool:
        """True when the file at ``real`` (backup path ``path``) is still the one recorded, ``size``
        bytes long, not written since; False when it was, or when that is not certain."""
        i = self._row(path)
        if i is None:
            return False
        try:
            now = identity(os.stat(real))
        except OSError:
            return False
        return now[2] == size and now == self._identity(i)

    def _row(self, path: str) -> int | None:
        """The record of backup path ``path`` once sealed, else None."""
        if self.sealed_at is None:
            return None
        h = path_hash(path)
        k = bisect_left(self.sorted, h)
        if k >= len(self.sorted) or self.sorted[k] != h:
            return None
        return self.order[k]

    def _identity(self, i: int) -> tuple[int, ...]:
        return tuple(c[i] for c in self.cols)
