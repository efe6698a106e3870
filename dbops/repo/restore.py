"""Restore side: a manifest + its packs back into a data folder; and verification.

Every stored frame the backup needs is read once: frames are grouped by pack, sorted
by offset and coalesced into ranged GETs (adjacent, or separated by less than
``MAX_GAP``, up to ``MAX_RANGE`` bytes each), fetched in parallel and decompressed
once each; every chunk the backup needs from a frame is checked against its sha256
and written with ``pwrite`` to every place that holds that content. All-zero chunks are never fetched: files are created at full size
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
from dbops.repo import codec
from dbops.repo.manifest import DIR, FILE, SYMLINK, ChunkRef, FileEntry, Manifest
from dbops.errors import NotFoundError, PreconditionError, StorageError, ValidationError
from dbops.storage.base import ObjectStore
from dbops.storage.layout import Layout

_log = log.get("backup.restore")

_INIT_FORK_RE = re.compile(r"^(base/\d+/\d+)_init$")

MAX_GAP = 256 * 1024
MAX_RANGE = 32 * 1024 * 1024

Progress = Callable[[int, int], None]  # (bytes done, bytes total); called from worker threads, serialised


@dataclass
class _Run:
    """Consecutive chunks of one frame that are also consecutive in one file: one pwrite."""

    file_no: int
    offset: int  # in the file
    refs: list[ChunkRef]

    @property
    def at(self) -> int:
        return self.refs[0].at

    @property
    def size(self) -> int:
        return self.refs[-1].at + self.refs[-1].raw - self.refs[0].at


@dataclass
class _Frame:
    """One stored frame (located by its first needed chunk's ref) and where its chunks go."""

    ref: ChunkRef
    runs: list[_Run] = field(default_factory=list)

    def chunks(self) -> int:
        """Distinct chunks needed from the frame."""
        if len(self.runs) == 1:
            return len(self.runs[0].refs)
        return len({c.at for run in self.runs for c in run.refs})


@dataclass
class _Range:
    pack: str
    start: int
    end: int
    frames: list[_Frame]

    @property
    def first_file(self) -> int:
        return self.frames[0].runs[0].file_no


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
    """Coalesced ranged reads covering every stored frame the files need, each frame once."""
    frames: dict[tuple[str, int], _Frame] = {}
    cs = manifest.chunk_size
    for i, f in enumerate(files):
        run: _Run | None = None
        run_pack, run_offset, run_end = "", -1, -1
        for n, c in enumerate(f.chunks):
            pack = c.pack
            if pack is None:
                run = None
            elif run is not None and c.offset == run_offset and c.at == run_end and pack == run_pack:
                run.refs.append(c)
                run_end += c.raw
            else:
                fr = frames.get((pack, c.offset))
                if fr is None:
                    fr = frames[(pack, c.offset)] = _Frame(c)
                run = _Run(i, n * cs, [c])
                fr.runs.append(run)
                run_pack, run_offset, run_end = pack, c.offset, c.at + c.raw
    by_pack: dict[str, list[_Frame]] = defaultdict(list)
    for (pack, _off), fr in frames.items():
        by_pack[pack].append(fr)
    ranges: list[_Range] = []
    for pack, frs in by_pack.items():
        frs.sort(key=lambda x: x.ref.offset)
        cur: _Range | None = None
        for fr in frs:
            r = fr.ref
            if cur and r.offset <= cur.end + MAX_GAP and r.offset + r.length - cur.start <= MAX_RANGE:
                cur.end = max(cur.end, r.offset + r.length)
                cur.frames.append(fr)
            else:
                cur = _Range(pack, r.offset, r.offset + r.length, [fr])
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


def _chunks_of(decoder: codec.Decoder, data: bytes, rng: _Range) -> Iterator[tuple[_Run, memoryview | None, str]]:
    """(run, its content, "") for every run of chunks the range's frames hold, each chunk checked
    against its sha256; (run, None, why) for a run with a damaged chunk (or frame)."""
    sha256 = codec.sha256
    for fr in rng.frames:
        r = fr.ref
        lo = r.offset - rng.start
        raw, why = _open_frame(decoder, r, data[lo:lo + r.length])
        for run in fr.runs:
            if raw is None:
                yield run, None, why
                continue
            why = ""
            for c in run.refs:
                if sha256(raw[c.at:c.at + c.raw]) != c.hash:
                    why = (f"chunk at offset {c.at} of the frame at offset {r.offset} fails its sha256 check "
                           f"(expected {c.hash[:16]}...)")
                    break
            yield (run, None, why) if why else (run, raw[run.at:run.at + run.size], "")


def _open_frame(decoder: codec.Decoder, r: ChunkRef, stored: bytes) -> tuple[memoryview | None, str]:
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
    # Fetches overlap freely; decompressing, hashing (one call per 8 KiB chunk) and writing run
    # at most one per core: more threads only fight over the GIL between those short calls.
    cpu_slots = threading.BoundedSemaphore(os.cpu_count() or 1)
    done = [0]

    def fetch(rng: _Range) -> None:
        key = layout.pack(rng.pack)
        try:
            data = _fetch(store, key, rng)
        except NotFoundError:
            raise ValidationError(
                f"backup {manifest.backup_id}: pack object {key} is missing",
                detail=f"needed for {files[rng.first_file].path}",
                hint="the backup cannot be restored; run `dbops verify` and take a new backup",
            ) from None
        fds: dict[int, int] = {}
        written = 0
        with cpu_slots:
            try:
                for run, raw, why in _chunks_of(decoder, data, rng):
                    if raw is None:
                        raise ValidationError(
                            f"backup {manifest.backup_id}: {files[run.file_no].path} is damaged in storage",
                            detail=f"object {key}: {why}",
                            hint="the backup cannot be restored; run `dbops verify` and take a new backup",
                        )
                    fd = fds.get(run.file_no)
                    if fd is None:
                        fd = fds[run.file_no] = os.open(target / files[run.file_no].path, os.O_WRONLY)
                    os.pwrite(fd, raw, run.offset)
                    written += len(raw)
            finally:
                for fd in fds.values():
                    os.close(fd)
        with lock:
            stats.fetched_bytes += len(data)
            stats.chunks += sum(fr.chunks() for fr in rng.frames)
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

    finish_files(target, files + unlogged + status, ids, parallel)
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


def finish_files(target: Path, files: list[FileEntry], ids: tuple[int, int] | None, parallel: int) -> None:
    """fsync each restored file, then set its mode, owner and mtime (in parallel)."""

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
        for _ in pool.map(finish_file, files):
            pass


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
        bad_runs = [(run, why) for run, raw, why in _chunks_of(decoder, data, rng) if raw is None]
        with lock:
            report.chunks += sum(fr.chunks() for fr in rng.frames)
            report.fetched_bytes += len(data)
            for run, why in bad_runs:
                bad[key].append(why)
                affected[key].add(files[run.file_no].path)

    with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="dbops-verify") as pool:
        for _ in pool.map(check, ranges):
            pass
    for key in sorted(missing):
        users = sorted({files[run.file_no].path for r in ranges if layout.pack(r.pack) == key for fr in r.frames
                        for run in fr.runs})
        report.problems.append(Problem(key, "object is missing", tuple(users[:10])))
    for key in sorted(bad):
        reasons = bad[key]
        more = f" (and {len(reasons) - 1} more bad chunks)" if len(reasons) > 1 else ""
        report.problems.append(Problem(key, reasons[0] + more, tuple(sorted(affected[key])[:10])))
    report.seconds = round(time.monotonic() - t0, 3)
    return report
