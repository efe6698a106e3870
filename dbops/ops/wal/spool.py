"""Asynchronous WAL push and restore prefetch, coordinated through a spool folder.

One spool per data folder and archive:
``<archive.spool_dir>/<system identifier>-<hash of the data folder>-<hash of the archive>/``, the
archive being (endpoint, bucket, prefix). Two archives of one cluster (an archive_command that runs
`wal-push` once per configuration) have separate completions and separate pushers, so a segment
stored in one archive is never acknowledged for the other.

    archive          the archive this spool serves (endpoint|bucket|prefix)
    pusher.lock      flock held by the running pusher (one per data folder and archive); holds its pid
    pusher.beat      touched by the pusher's loop, so a wedged pusher is noticed
    pusher.log       the background workers' log
    done/NAME        a verified upload: archive, sha256, key, and size/inode/mtime of the file pushed
    failed/NAME      the last failed attempt: time, exit code, message
    wants/NAME       a waiting `wal-push` (holds the file's path); wakes the pusher for it
    prefetch/<tag>/NAME   verified segments fetched ahead of `wal-fetch` (one folder per archive)
    prefetch.lock, prefetch.want

`wal-push` returns 0 only when done/NAME matches the very file PostgreSQL handed it and names
this archive, and done/NAME is written only after the object is stored with a server-verified checksum.
The pusher never writes into pg_wal/archive_status (PostgreSQL owns it); it only reads
which segments are ready. This module imports neither typer nor boto3: the archive_command
fast path goes through it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dbops.errors import DbopsError, PreconditionError, UnknownOutcomeError
from dbops.fsafe import private_dir
from dbops.pg.walfile import data_dir_of, read_system_identifier
from dbops.pg.lsn import HISTORY_RE, SEGMENT_RE

if TYPE_CHECKING:
    import subprocess

    from dbops.config import ArchiveSettings, Config, StorageSettings

PUSHER = "pusher"
PREFETCHER = "prefetch"
STALE_BEAT = 60.0  # a pusher whose loop has not ticked for this long is wedged
_LOG_MAX = 8 * 1024 * 1024


# --------------------------------------------------------------------------- the spool folder


def spool_root(settings: ArchiveSettings, data_dir: Path) -> Path:
    """The configured spool folder, or `dbops-spool` next to the data folder, or ~/.dbops/spool.

    Never a shared temporary folder: another local user could create it first (issue 13 item 11).
    """
    if settings.spool_dir:
        return Path(settings.spool_dir)
    parent = data_dir.resolve().parent
    beside = parent / "dbops-spool"
    if beside.is_dir() or os.access(parent, os.W_OK):
        return beside
    return Path(os.path.expanduser("~")) / ".dbops" / "spool"


def archive_id(storage: StorageSettings) -> str:
    """The archive a spool serves: endpoint, bucket and prefix (two archives never share records)."""
    endpoint = (storage.endpoint or "s3").rstrip("/")
    return f"{endpoint}|{storage.bucket}|{storage.prefix.strip('/')}"


def spool_for(settings: ArchiveSettings, data_dir: Path, storage: StorageSettings) -> Spool:
    real = os.path.realpath(data_dir)
    sysid = read_system_identifier(data_dir)
    archive = archive_id(storage)
    return Spool(spool_root(settings, data_dir) / f"{sysid}-{_tag(real)}-{_tag(archive)}", Path(real), archive)


def _tag(text: str) -> str:
    """A short stable name for a path or an archive (zlib: cheaper to import than hashlib)."""
    b = text.encode()
    return f"{zlib.crc32(b):08x}{zlib.adler32(b):08x}"


@dataclass(frozen=True)
class Failure:
    at: float
    exit_code: int
    message: str
    detail: str | None = None
    hint: str | None = None

    def error(self) -> DbopsError:
        e = DbopsError(self.message, detail=self.detail, hint=self.hint)
        e.exit_code = self.exit_code  # type: ignore[assignment]  # keeps the original error's code
        return e


@dataclass(frozen=True)
class Want:
    """A waiting `wal-push`: the file, when it asked, and the configuration file it runs with."""

    path: str
    asked: float
    config: str | None = None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


class Spool:
    def __init__(self, root: Path, data_dir: Path, archive: str):
        self.root = root
        self.data_dir = data_dir
        self.archive = archive
        self.done = root / "done"
        self.failed = root / "failed"
        self.wants = root / "wants"
        self.log_path = root / "pusher.log"

    def ensure(self) -> Spool:
        private_dir(self.root.parent, create=True)
        for d in (self.root, self.done, self.failed, self.wants, self.root / "prefetch"):
            private_dir(d, create=True)
        for name, text in (("data_dir", str(self.data_dir)), ("archive", self.archive)):
            marker = self.root / name
            if not marker.exists():
                _write_atomic(marker, text + "\n")
        return self

    # -- completions
    def is_stored(self, name: str, path: str | os.PathLike) -> bool:
        """done/NAME records this very file stored in this spool's archive."""
        rec = _read_json(self.done / name)
        if rec is None or rec.get("archive") != self.archive:
            return False
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        return (rec.get("size"), rec.get("ino"), rec.get("mtime_ns")) == (st.st_size, st.st_ino, st.st_mtime_ns)

    def record_stored(self, name: str, st: os.stat_result, sha256: str, key: str) -> None:
        _write_atomic(self.done / name, json.dumps({
            "archive": self.archive, "sha256": sha256, "key": key, "size": st.st_size, "ino": st.st_ino,
            "mtime_ns": st.st_mtime_ns, "at": time.time()}))
        (self.failed / name).unlink(missing_ok=True)

    def record_failure(self, name: str, err: DbopsError) -> None:
        _write_atomic(self.failed / name, json.dumps({
            "at": time.time(), "exit_code": int(err.exit_code), "message": err.message,
            "detail": err.detail, "hint": err.hint}))

    def failure(self, name: str) -> Failure | None:
        rec = _read_json(self.failed / name)
        if rec is None:
            return None
        return Failure(float(rec["at"]), int(rec["exit_code"]), rec["message"], rec.get("detail"), rec.get("hint"))

    # -- waiting callers
    def want(self, name: str, path: str, config: str | None = None) -> None:
        _write_atomic(self.wants / name, os.path.abspath(path) + "\n" + (os.path.abspath(config) if config else ""))

    def unwant(self, name: str) -> None:
        (self.wants / name).unlink(missing_ok=True)

    def wanted(self) -> dict[str, Want]:
        out: dict[str, Want] = {}
        try:
            entries = list(os.scandir(self.wants))
        except FileNotFoundError:
            return out
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                path, _, config = Path(e.path).read_text().partition("\n")
                out[e.name] = Want(path.strip(), e.stat().st_mtime, config.strip() or None)
            except FileNotFoundError:
                continue
        return out

    def prune(self, keep: set[str], older_than: float = 0.0) -> None:
        """Forget records of files PostgreSQL no longer offers (its .ready is gone)."""
        cutoff = time.time() - older_than
        for d in (self.done, self.failed, self.wants):
            try:
                entries = list(os.scandir(d))
            except FileNotFoundError:
                continue
            for e in entries:
                if e.name in keep:
                    continue
                try:
                    if e.stat().st_mtime < cutoff:
                        os.unlink(e.path)
                except FileNotFoundError:
                    pass

    # -- the one-per-data-folder workers
    def lock_path(self, which: str) -> Path:
        return self.root / f"{which}.lock"

    def try_lock(self, which: str) -> int | None:
        """Take the worker's lock (kept until the process exits); None when another holds it."""
        fd = os.open(self.lock_path(which), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    def lock_held(self, which: str) -> bool:
        try:
            fd = os.open(self.lock_path(which), os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)
        return False

    def holder_pid(self, which: str) -> int | None:
        try:
            return int(self.lock_path(which).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def beat(self) -> None:
        p = self.root / "pusher.beat"
        try:
            os.utime(p)
        except FileNotFoundError:
            p.touch()

    def beat_age(self) -> float | None:
        try:
            return time.time() - (self.root / "pusher.beat").stat().st_mtime
        except FileNotFoundError:
            return None

    # -- prefetch
    def prefetch_dir(self, storage: StorageSettings) -> Path:
        return self.root / "prefetch" / _tag(archive_id(storage))

    def set_prefetch_want(self, name: str) -> None:
        _write_atomic(self.root / "prefetch.want", name)

    def prefetch_want(self) -> str | None:
        try:
            return (self.root / "prefetch.want").read_text().strip() or None
        except FileNotFoundError:
            return None

    def state(self) -> dict:
        """What `wal status` shows about this spool."""
        def count(d: Path) -> int:
            try:
                return sum(1 for e in os.scandir(d) if not e.name.startswith("."))
            except FileNotFoundError:
                return 0

        failures = {}
        for e in sorted(os.scandir(self.failed), key=lambda e: e.name) if self.failed.is_dir() else []:
            f = self.failure(e.name)
            if f:
                failures[e.name] = {"at": f.at, "exit_code": f.exit_code, "message": f.message}
        return {"spool": str(self.root), "pusher_running": self.lock_held(PUSHER),
                "pusher_pid": self.holder_pid(PUSHER) if self.lock_held(PUSHER) else None,
                "recorded_done": count(self.done), "waiting_calls": count(self.wants), "failures": failures}


# --------------------------------------------------------------------------- wal-push (client side)


def _archive(cfg: Config):
    from dbops.ops.wal.archive import WalArchive
    from dbops.storage import open_archive

    return WalArchive(*open_archive(cfg.storage), compression=cfg.compression,
                      cluster_name=cfg.cluster)


def push(cfg: Config, wal_path: str, *, sync: bool = False,
         start_pusher: Callable[[Spool], subprocess.Popen | None] | None = None) -> str:
    """archive_command: returns (how it was acknowledged) only once the file is stored; else raises.

    'spool': the pusher had stored it already; 'pusher': it was stored while this call waited;
    'sync': uploaded by this process (async off, or the pusher could not be kept running).
    """
    if sync or not cfg.archive.async_push:
        push_sync(cfg, wal_path)
        return "sync"
    name = os.path.basename(wal_path)
    data_dir = data_dir_of(wal_path)
    if os.geteuid() == 0 and data_dir.stat().st_uid != 0:
        raise PreconditionError(
            "wal-push runs as the owner of the data folder, not as root",
            detail=f"{data_dir} belongs to uid {data_dir.stat().st_uid}",
            hint="PostgreSQL runs archive_command as its own user; to push by hand use "
                 "`runuser -u postgres -- dbops wal-push ...` (or --sync)",
        )
    try:
        spool = spool_for(cfg.archive, data_dir, cfg.storage).ensure()
        if spool.is_stored(name, wal_path):
            return "spool"
        starter = start_pusher or (lambda sp: spawn_worker(cfg, PUSHER, data_dir, sp))
        if await_pusher(spool, name, wal_path, timeout=cfg.archive.push_timeout, start_pusher=starter,
                        config=cfg.path):
            return "pusher"
    except (OSError, PreconditionError) as e:  # full, or not a folder of ours: archive on without it
        _warn("spool unusable (%s); pushing %s synchronously", getattr(e, "message", e), name)
        push_sync(cfg, wal_path)
        return "sync"
    _warn("the background pusher could not be kept running; pushing %s synchronously (see %s)",
          name, spool.log_path)
    push_sync(cfg, wal_path, spool=spool)
    return "sync"


def _warn(msg: str, *args) -> None:
    from dbops import log  # logging is imported only when there is something to say

    log.get("wal").warning(msg, *args)


def await_pusher(spool: Spool, name: str, wal_path: str, *, timeout: float,
                 start_pusher: Callable[[Spool], subprocess.Popen | None], config: str | None = None) -> bool:
    """Wait until the pusher records `name` stored (True), or raise its failure.

    Returns False when no pusher can be kept running (the caller then pushes itself).
    Raises UnknownOutcomeError when the time is up: PostgreSQL keeps the segment and retries.
    """
    t0 = time.time()
    deadline = time.monotonic() + timeout
    spool.want(name, wal_path, config)
    child = None
    spawns = 0
    delay = 0.002
    try:
        while True:
            if spool.is_stored(name, wal_path):
                return True
            f = spool.failure(name)
            if f is not None and f.at >= t0:
                raise f.error()
            if spool.lock_held(PUSHER):
                age = spool.beat_age()
                if age is not None and age > STALE_BEAT:
                    return False
            elif child is None or child.poll() is not None:
                if spawns >= 2:
                    return False
                child = start_pusher(spool)
                spawns += 1
            if time.monotonic() > deadline:
                raise UnknownOutcomeError(
                    f"{name} was not confirmed stored within {timeout:.0f} s",
                    hint=f"PostgreSQL keeps the segment and calls again; see {spool.log_path}",
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
    finally:
        spool.unwant(name)


def push_sync(cfg: Config, wal_path: str, *, spool: Spool | None = None):
    """Upload in this process (imports boto3). Records the completion in the spool when there is one."""
    from dbops.pg.walfile import cluster_identity

    st = os.stat(wal_path)
    data_dir = data_dir_of(wal_path)
    res = _archive(cfg).push(wal_path, cluster_identity(data_dir, wal_path))
    if spool is not None:
        spool.record_stored(res.name, st, res.sha256, res.key)
    return res


def spawn_worker(cfg: Config, which: str, data_dir: Path, spool: Spool) -> subprocess.Popen | None:
    """Start a detached background worker (pusher or prefetcher) for this data folder."""
    from dbops import proc

    if not cfg.path:
        return None
    _rotate(spool.log_path)
    with open(spool.log_path, "ab") as logf:
        return proc.spawn([sys.executable, "-m", "dbops.ops.wal.worker", which, "--config",
                           os.path.abspath(cfg.path), "--data-dir", str(data_dir)],
                          cwd=str(data_dir), stdout=logf, stderr=logf)


def _rotate(path: Path) -> None:
    try:
        if path.stat().st_size > _LOG_MAX:
            os.replace(path, path.with_suffix(".log.1"))
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------- wal-fetch (client side)


def _fetch_spool(cfg: Config, dest: str) -> Spool | None:
    """The prefetch spool of the data folder dest belongs to, if there is one this process may use.

    root never writes into a spool of a data folder it does not own: the files would then be
    unusable for the postgres user that runs restore_command.
    """
    try:
        data_dir = data_dir_of(dest)
        if os.geteuid() == 0 and data_dir.stat().st_uid != 0:
            return None
        return spool_for(cfg.archive, data_dir, cfg.storage)
    except (DbopsError, OSError):
        return None


def fetch_prefetched(cfg: Config, name: str, dest: str) -> bool:
    """Serve `name` from the prefetch spool if it is there (no boto3); keeps the prefetcher going.

    Any trouble with the spool is a miss, never a failure: restore_command then downloads itself
    (a failing restore_command would end recovery early).
    """
    if not SEGMENT_RE.match(name) or cfg.archive.prefetch <= 0:
        return False
    spool = _fetch_spool(cfg, dest)
    if spool is None:
        return False
    src = spool.prefetch_dir(cfg.storage) / name
    try:
        if not src.exists():
            return False
        spool.set_prefetch_want(name)
        _move_into_place(src, Path(dest))
    except OSError:  # e.g. taken away by the prefetcher's clean-up a moment ago
        return False
    _poke(cfg, spool)
    return True


def fetch(cfg: Config, name: str, dest: str) -> str:
    """restore_command: 'prefetch' or 'archive'. NotFoundError (exit 9) when the archive lacks it."""
    if fetch_prefetched(cfg, name, dest):
        return "prefetch"
    _archive(cfg).fetch(name, dest)
    if SEGMENT_RE.match(name) and cfg.archive.prefetch > 0:
        spool = _fetch_spool(cfg, dest)
        if spool is not None:
            try:
                spool.ensure().set_prefetch_want(name)
            except OSError:
                return "archive"
            _poke(cfg, spool)
    return "archive"


def _poke(cfg: Config, spool: Spool) -> None:
    try:
        poke_prefetcher(cfg, spool)
    except (DbopsError, OSError) as e:  # prefetching is an optimisation
        _warn("cannot start the prefetcher: %s", getattr(e, "message", e))


def poke_prefetcher(cfg: Config, spool: Spool) -> None:
    if not spool.lock_held(PREFETCHER):
        spawn_worker(cfg, PREFETCHER, spool.data_dir, spool)


def _move_into_place(src: Path, dest: Path) -> None:
    from dbops.ops.wal.archive import fsync_dir

    try:
        os.replace(src, dest)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while block := fin.read(1 << 20):
                fout.write(block)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dest)
        src.unlink(missing_ok=True)
    fsync_dir(dest.parent)


def push_order(name: str) -> tuple[int, str]:
    """History files first (a new timeline's segments are useless without them), then by name."""
    return (0 if HISTORY_RE.match(name) else 1, name)
