"""Restore side: a manifest + its packs back into a data folder; and verification.

Every stored chunk the backup needs is read once: chunks are grouped by pack, sorted
by offset and coalesced into ranged GETs (adjacent, or separated by less than
``MAX_GAP``, up to ``MAX_RANGE`` bytes each), fetched in parallel, checked against
their sha256, decompressed and written with ``pwrite`` to every place that holds
that content. All-zero chunks are never fetched: files are created at full size
(sparse) and those chunks stay holes.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from dbops import log
from dbops.backup import codec
from dbops.backup.manifest import DIR, FILE, SYMLINK, ChunkRef, FileEntry, Manifest
from dbops.errors import NotFoundError, PreconditionError, StorageError, ValidationError
from dbops.storage.base import ObjectStore
from dbops.storage.layout import Layout

_log = log.get("backup.restore")

_INIT_FORK_RE = re.compile(r"^(base/\d+/\d+)_init$")

MAX_GAP = 256 * 1024
MAX_RANGE = 32 * 1024 * 1024

Progress = Callable[[int, int], None]  # (bytes done, bytes total); called from worker threads, serialised


@dataclass
class _Need:
    """One stored chunk and every (file, offset) that holds its content."""

    ref: ChunkRef
    dests: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class _Range:
    pack: str
    start: int
    end: int
    needs: list[_Need]


@dataclass
class RestoreStats:
    backup_id: str
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    logical_bytes: int = 0  # size of all restored files
    fetched_bytes: int = 0  # bytes read from storage
    chunks: int = 0  # distinct stored chunks fetched and verified
    requests: int = 0  # ranged GETs
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # create, fetch, finish (fsync)


@dataclass(frozen=True)
class Problem:
    key: str  # the object at fault
    reason: str
    files: tuple[str, ...] = ()  # some files whose content is affected


@dataclass
class VerifyReport:
    backup_id: str
    objects: int = 0
    chunks: int = 0
    fetched_bytes: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# ---------------------------------------------------------------------- planning


def plan_ranges(manifest: Manifest, files: list[FileEntry]) -> list[_Range]:
    """Coalesced ranged reads covering every stored chunk the files need, each chunk once."""
    needs: dict[tuple[str, int], _Need] = {}
    for i, f in enumerate(files):
        for n, c in enumerate(f.chunks):
            if c.pack is None:
                continue
            need = needs.get((c.pack, c.offset))
            if need is None:
                need = needs[(c.pack, c.offset)] = _Need(c)
            need.dests.append((i, n * manifest.chunk_size))
    by_pack: dict[str, list[_Need]] = defaultdict(list)
    for (pack, _off), need in needs.items():
        by_pack[pack].append(need)
    ranges: list[_Range] = []
    for pack, ns in by_pack.items():
        ns.sort(key=lambda x: x.ref.offset)
        cur: _Range | None = None
        for need in ns:
            r = need.ref
            if cur and r.offset <= cur.end + MAX_GAP and r.offset + r.length - cur.start <= MAX_RANGE:
                cur.end = max(cur.end, r.offset + r.length)
                cur.needs.append(need)
            else:
                cur = _Range(pack, r.offset, r.offset + r.length, [need])
                ranges.append(cur)
    # Largest first so the pool finishes evenly.
    ranges.sort(key=lambda r: r.end - r.start, reverse=True)
    return ranges


def _fetch(store: ObjectStore, key: str, rng: _Range) -> bytes:
    """The range's bytes; short (or empty) when the object is truncated; NotFoundError when absent."""
    try:
        return store.get_range(key, rng.start, rng.end - rng.start)
    except StorageError:
        # S3 refuses a range that starts past the end (InvalidRange): a truncated object.
        info = store.head(key)
        if info is None:
            raise NotFoundError(f"object {key} not found") from None
        if info.size <= rng.start:
            return b""
        raise


def _chunks_of(data: bytes, rng: _Range) -> Iterator[tuple[_Need, bytes]]:
    for need in rng.needs:
        lo = need.ref.offset - rng.start
        yield need, data[lo:lo + need.ref.length]


def _check(decoder: codec.Decoder, need: _Need, stored: bytes) -> tuple[bytes | None, str]:
    """(content, "") when the chunk is intact, else (None, why)."""
    r = need.ref
    if len(stored) != r.length:
        return None, f"object too short: chunk at offset {r.offset} has {len(stored)} of {r.length} bytes"
    try:
        raw = decoder.decode(stored, r.raw)
    except zstandard.ZstdError as e:
        return None, f"chunk at offset {r.offset} does not decompress: {e}"
    if len(raw) != r.raw or codec.sha256(raw) != r.hash:
        return None, f"chunk at offset {r.offset} fails its sha256 check (expected {r.hash[:16]}...)"
    return raw, ""


# ---------------------------------------------------------------------- restore


def _owner_ids(owner: str | None) -> tuple[int, int] | None:
    if owner is None:
        return None
    try:
        pw = pwd.getpwnam(owner)
    except KeyError:
        raise PreconditionError(f"no OS user named {owner!r} to own the restored files") from None
    return pw.pw_uid, pw.pw_gid


def _prepare_target(target: Path) -> None:
    if target.exists():
        if not target.is_dir() or any(target.iterdir()):
            raise PreconditionError(
                f"restore target {target} exists and is not an empty folder",
                hint="restore into a new or empty folder",
            )
    else:
        target.mkdir(parents=True, mode=0o700)


def restore_snapshot(
    store: ObjectStore,
    layout: Layout,
    manifest: Manifest,
    target_dir: str,
    *,
    parallel: int,
    progress: Progress | None = None,
    owner: str | None = None,
) -> RestoreStats:
    """Restore one backup into target_dir (new or empty), verified chunk by chunk, then fsynced.

    ``owner``: OS user to own every restored entry (e.g. "postgres" when running as root).
    Raises ValidationError naming the backup, file and object key on a bad or missing object.
    """
    t0 = time.monotonic()
    manifest.check()
    ids = _owner_ids(owner)
    target = Path(target_dir)
    _prepare_target(target)
    files = [f for f in manifest.files if f.type == FILE]
    stats = RestoreStats(manifest.backup_id, files=len(files), logical_bytes=sum(f.size for f in files))

    # 1. folders (writable for now), then every file created at its full size.
    for e in manifest.files:
        if e.type == DIR and e.path != ".":
            (target / e.path).mkdir(mode=0o700, exist_ok=True)
            stats.dirs += 1
    for f in files:
        fd = os.open(target / f.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, f.size)
        finally:
            os.close(fd)

    # 2. content: parallel ranged GETs, verified, written where it belongs.
    ranges = plan_ranges(manifest, files)
    decoder = codec.Decoder()
    lock = threading.Lock()
    done = [0]

    def fetch(rng: _Range) -> None:
        key = layout.pack(rng.pack)
        try:
            data = _fetch(store, key, rng)
        except NotFoundError:
            raise ValidationError(
                f"backup {manifest.backup_id}: pack object {key} is missing",
                detail=f"needed for {files[rng.needs[0].dests[0][0]].path}",
                hint="the backup cannot be restored; run `dbops verify` and take a new backup",
            ) from None
        fds: dict[int, int] = {}
        written = 0
        try:
            for need, stored in _chunks_of(data, rng):
                raw, why = _check(decoder, need, stored)
                if raw is None:
                    raise ValidationError(
                        f"backup {manifest.backup_id}: {files[need.dests[0][0]].path} is damaged in storage",
                        detail=f"object {key}: {why}",
                        hint="the backup cannot be restored; run `dbops verify` and take a new backup",
                    )
                for file_no, off in need.dests:
                    fd = fds.get(file_no)
                    if fd is None:
                        fd = fds[file_no] = os.open(target / files[file_no].path, os.O_WRONLY)
                    os.pwrite(fd, raw, off)
                    written += len(raw)
        finally:
            for fd in fds.values():
                os.close(fd)
        with lock:
            stats.fetched_bytes += len(data)
            stats.chunks += len(rng.needs)
            stats.requests += 1
            done[0] += written
            if progress:
                progress(done[0], stats.logical_bytes)

    t_fetch = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="dbops-restore") as pool:
        for _ in pool.map(fetch, ranges):
            pass

    t_finish = time.monotonic()
    # 3. symlinks, the WAL folder PostgreSQL expects, then modes, times, owner, fsync.
    for e in manifest.files:
        if e.type == SYMLINK:
            os.symlink(e.target or "", target / e.path)
            stats.symlinks += 1
    (target / "pg_wal" / "archive_status").mkdir(parents=True, mode=0o700, exist_ok=True)
    status = _mark_wal_archived(target, manifest)
    unlogged = _reset_unlogged(target, manifest)

    def finish_file(f: FileEntry) -> None:
        p = target / f.path
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(p, f.mode)
        if ids:
            os.chown(p, *ids)
        os.utime(p, ns=(f.mtime_ns, f.mtime_ns))

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        for _ in pool.map(finish_file, files + unlogged + status):
            pass
    _finish_tree(target, manifest, ids)
    t_end = time.monotonic()
    stats.seconds = round(t_end - t0, 3)
    stats.timings = {"create": round(t_fetch - t0, 3), "fetch": round(t_finish - t_fetch, 3),
                     "finish": round(t_end - t_finish, 3)}
    _log.info("restored backup %s into %s: %d files, %d bytes, %d requests, %.1f s", manifest.backup_id,
              target, stats.files, stats.logical_bytes, stats.requests, stats.seconds)
    return stats


def _mark_wal_archived(target: Path, manifest: Manifest) -> list[FileEntry]:
    """archive_status/<name>.done for every WAL file the backup carries (as pg_basebackup does):
    they came from, or belong in, the archive and must not be archived again from here."""
    made = []
    for e in manifest.files:
        if e.type == FILE and e.path.startswith("pg_wal/") and e.path.count("/") == 1:
            rel = f"pg_wal/archive_status/{e.path[7:]}.done"
            (target / rel).touch(mode=0o600)
            made.append(FileEntry(rel, FILE, 0o600, e.mtime_ns))
    return made


def _reset_unlogged(target: Path, manifest: Manifest) -> list[FileEntry]:
    """Give every unlogged relation its main fork as a copy of its _init fork, as PostgreSQL's
    recovery does: the snapshot left those forks out, and a start without recovery would not
    recreate them. Returns the created files (to be finished like the others)."""
    paths = {e.path for e in manifest.files}
    made = []
    for e in manifest.files:
        m = _INIT_FORK_RE.match(e.path)
        if e.type == FILE and m and m.group(1) not in paths:
            shutil.copyfile(target / e.path, target / m.group(1))
            made.append(FileEntry(m.group(1), FILE, e.mode, e.mtime_ns, e.size))
    return made


def _finish_tree(target: Path, manifest: Manifest, ids: tuple[int, int] | None) -> None:
    """Symlink owners, folder modes/times (deepest first, so parents' times stick), fsync folders."""
    recorded = {e.path: e for e in manifest.files}
    dirs = sorted({e.path for e in manifest.files if e.type == DIR} | {"pg_wal", "pg_wal/archive_status"},
                  key=lambda p: (p.count("/"), p) if p != "." else (-1, p), reverse=True)
    if ids:
        for e in manifest.files:
            if e.type == SYMLINK:
                os.lchown(target / e.path, *ids)
    for rel in dirs:
        p = target / rel
        e = recorded.get(rel)
        if ids:
            os.chown(p, *ids)
        os.chmod(p, e.mode if e else 0o700)
        fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if e:
            os.utime(p, ns=(e.mtime_ns, e.mtime_ns))
    parent = target.resolve().parent
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- verify


def verify_backup(store: ObjectStore, layout: Layout, manifest: Manifest, parallel: int) -> VerifyReport:
    """Re-read and hash every stored chunk the backup needs; report every bad object found."""
    t0 = time.monotonic()
    report = VerifyReport(manifest.backup_id)
    try:
        manifest.check()
    except ValidationError as e:
        report.problems.append(Problem(layout.manifest(manifest.backup_id), e.message))
        return report
    files = [f for f in manifest.files if f.type == FILE]
    ranges = plan_ranges(manifest, files)
    report.objects = len({r.pack for r in ranges})
    decoder = codec.Decoder()
    lock = threading.Lock()
    missing: set[str] = set()
    bad: dict[str, list[str]] = defaultdict(list)
    affected: dict[str, set[str]] = defaultdict(set)

    def check(rng: _Range) -> None:
        key = layout.pack(rng.pack)
        with lock:
            if key in missing:
                return
        try:
            data = _fetch(store, key, rng)
        except NotFoundError:
            with lock:
                missing.add(key)
            return
        for need, stored in _chunks_of(data, rng):
            raw, why = _check(decoder, need, stored)
            with lock:
                report.chunks += 1
                if raw is None:
                    bad[key].append(why)
                    affected[key].update(files[i].path for i, _ in need.dests)
        with lock:
            report.fetched_bytes += len(data)

    with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="dbops-verify") as pool:
        for _ in pool.map(check, ranges):
            pass
    for key in sorted(missing):
        users = sorted({files[i].path for r in ranges if layout.pack(r.pack) == key for n in r.needs
                        for i, _ in n.dests})
        report.problems.append(Problem(key, "object is missing", tuple(users[:10])))
    for key in sorted(bad):
        reasons = bad[key]
        more = f" (and {len(reasons) - 1} more bad chunks)" if len(reasons) > 1 else ""
        report.problems.append(Problem(key, reasons[0] + more, tuple(sorted(affected[key])[:10])))
    report.seconds = round(time.monotonic() - t0, 3)
    return report
