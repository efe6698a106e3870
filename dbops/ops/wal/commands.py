"""`wal-push` and `wal-fetch` as PostgreSQL's archive_command and restore_command call them: the
client side of the spool (dbops.ops.wal.spool) and of its background workers (dbops.ops.wal.worker).

This module imports neither typer nor boto3 at import time: the WAL fast path goes through it.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dbops.errors import DbopsError, PreconditionError, UnknownOutcomeError
from dbops.ops.wal.spool import LOG_MAX, PREFETCHER, PUSHER, STALE_BEAT, Spool, spool_for
from dbops.pg.lsn import SEGMENT_RE
from dbops.pg.walfile import data_dir_of

if TYPE_CHECKING:
    import subprocess

    from dbops.config import Config


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
        if path.stat().st_size > LOG_MAX:
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
