"""Finishing a restored data folder: what PostgreSQL expects besides the files' content (WAL
marked archived, unlogged relations reset), then each file and folder fsynced (when durable),
with its recorded mode, owner and time. Used by :mod:`dbops.repo.restore` and ``restore --delta``."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dbops.fsafe import NOFOLLOW
from dbops.repo.manifest import DIR, FILE, SYMLINK, FileEntry, Manifest
from dbops.repo.mlisting import Listed
from dbops.repo.ranges import run_bounded

_INIT_FORK_RE = re.compile(r"^((?:base/\d+|pg_tblspc/\d+/PG_[^/]+/\d+)/\d+)_init$")


def as_restored(e: FileEntry) -> FileEntry:
    """An entry as a restore creates it: a symlinked pg_wal becomes an empty folder of its own
    (a restored copy must not point at another machine's WAL folder, as the walk does at backup time)."""
    return FileEntry(e.path, DIR, 0o700, e.mtime_ns) if e.type == SYMLINK and e.path == "pg_wal" else e


def mark_wal_archived(target: Path, manifest: Manifest) -> list[FileEntry]:
    """archive_status/<name>.done for every WAL file the backup carries (as pg_basebackup does):
    they came from, or belong in, the archive and must not be archived again from here."""
    made = []
    for e in manifest.listing():
        if e.type == FILE and e.path.startswith("pg_wal/") and e.path.count("/") == 1:
            rel = f"pg_wal/archive_status/{e.path[7:]}.done"
            (target / rel).touch(mode=0o600)
            made.append(FileEntry(rel, FILE, 0o600, e.mtime_ns))
    return made


def reset_unlogged(target: Path, manifest: Manifest, listed: Listed | None = None) -> list[FileEntry]:
    """Give every unlogged relation its main fork as a copy of its _init fork, as PostgreSQL's
    recovery does: the snapshot left those forks out, and a start without recovery would not
    recreate them. Returns the created files (to be finished like the others). ``listed``: the
    manifest's listing kept (:meth:`Manifest.kept_listing`), searched instead of a set of every path."""
    inits = [(e, m.group(1)) for e in manifest.listing() if e.type == FILE and (m := _INIT_FORK_RE.match(e.path))]
    if not inits:
        return []
    has = listed.contains if listed is not None else {e.path for e in manifest.listing()}.__contains__
    made = []
    for e, main in inits:
        if not has(main):
            shutil.copyfile(target / e.path, target / main)
            made.append(FileEntry(main, FILE, e.mode, e.mtime_ns, e.size))
    return made


FINISH_RUN = 64  # files a task finishes at most: a task per empty file costs more than its finish
FINISH_RUN_BYTES = 8 << 20  # and no more once its files hold that much: big files' fsyncs stay in parallel


def _runs(files: Iterable[FileEntry]) -> Iterator[list[FileEntry]]:
    run: list[FileEntry] = []
    size = 0
    for f in files:
        run.append(f)
        size += f.size
        if len(run) >= FINISH_RUN or size >= FINISH_RUN_BYTES:
            yield run
            run, size = [], 0
    if run:
        yield run


def finish_files(target: Path, files: Iterable[FileEntry], ids: tuple[int, int] | None, parallel: int,
                 durable: bool = True) -> None:
    """finish_file for each, in parallel: a task finishes a run of small files, or one big file."""
    def run(fs: list[FileEntry]) -> None:
        for f in fs:
            finish_file(target, f, ids, durable)

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        run_bounded(pool, run, _runs(files), 2 * max(1, parallel))


def finish_file(target: Path, f: FileEntry, ids: tuple[int, int] | None, durable: bool = True,
                then: Callable[[str], None] | None = None) -> None:
    """fsync a restored file (when durable), then set its mode, owner and mtime; then ``then(f.path)``."""
    fd = os.open(os.path.join(target, f.path), os.O_RDONLY | NOFOLLOW)  # no Path made per file
    try:
        if durable:
            os.fsync(fd)
        os.fchmod(fd, f.mode)
        if ids:
            os.fchown(fd, *ids)
        os.utime(fd, ns=(f.mtime_ns, f.mtime_ns))
    finally:
        os.close(fd)
    if then is not None:
        then(f.path)


def finish_tree(target: Path, manifest: Manifest, ids: tuple[int, int] | None, durable: bool = True) -> None:
    """Link owners, folder modes/times (deepest first, so parents' times stick), fsync folders;
    each folder opened without following a link."""
    recorded = {}
    for e in map(as_restored, manifest.listing()):
        if e.type == DIR:
            recorded[e.path] = e
        elif e.type == SYMLINK and ids and (target / e.path).is_symlink():
            os.lchown(target / e.path, *ids)
    dirs = sorted(set(recorded) | {"pg_wal", "pg_wal/archive_status"},
                  key=lambda p: (p.count("/"), p) if p != "." else (-1, p), reverse=True)
    for rel in dirs:
        e = recorded.get(rel)
        fd = os.open(target / rel, os.O_RDONLY | os.O_DIRECTORY | NOFOLLOW)
        try:
            if ids:
                os.fchown(fd, *ids)
            os.fchmod(fd, e.mode if e else 0o700)
            if durable:
                os.fsync(fd)
            if e:
                os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
        finally:
            os.close(fd)
    if not durable:
        return
    parent = target.resolve().parent
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
