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
fast path goes through it (with dbops.ops.wal.commands, the client side).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dbops.errors import DbopsError
from dbops.fsafe import private_dir
from dbops.pg.walfile import read_system_identifier
from dbops.pg.lsn import HISTORY_RE

if TYPE_CHECKING:
    from dbops.config import ArchiveSettings, StorageSettings

PUSHER = "pusher"
PREFETCHER = "prefetch"
STALE_BEAT = 60.0  # a pusher whose loop has not ticked for this long is wedged
LOG_MAX = 8 * 1024 * 1024  # the workers' log is rotated at this size


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
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:  # a full spool disk: the flock excludes all the same, the PID only names the holder
            pass
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


def push_order(name: str) -> tuple[int, str]:
    """History files first (a new timeline's segments are useless without them), then by name."""
    return (0 if HISTORY_RE.match(name) else 1, name)
