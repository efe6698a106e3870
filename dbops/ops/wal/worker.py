"""The background workers behind `wal-push` and `wal-fetch` (one of each per data folder).

* :class:`Pusher` uploads every segment PostgreSQL has marked ready (and any a waiting
  `wal-push` asks for), several at a time, and records each verified completion in the
  spool. It exits when idle, when the data folder is gone, or (watchdog) when an upload
  hangs past every timeout, so the next `wal-push` starts a fresh one.
* :class:`Prefetcher` keeps the next few segments after the one `wal-fetch` last asked
  for downloaded, verified and decompressed in the spool.

Run as ``python -m dbops.ops.wal.worker {pusher|prefetch} --config CFG --data-dir DIR``.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from dbops import log
from dbops.errors import DbopsError, NotFoundError
from dbops.ops.wal.archive import WalArchive
from dbops.pg.walfile import ClusterIdentity
from dbops.ops.wal.spool import PREFETCHER, PUSHER, Spool, Want, push_order
from dbops.pg.lsn import DEFAULT_SEGMENT_SIZE, SEGMENT_RE, next_segment

_log = log.get("walworker")


def _fingerprint(paths: list[Path]) -> list[tuple[int, int] | None]:
    out = []
    for p in paths:
        try:
            st = p.stat()
            out.append((st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return out


class Watch:
    """Notices a change of the configuration (or credentials) file the worker started with."""

    def __init__(self, paths: list[Path] | None = None):
        self.paths = list(paths or [])
        self.config = os.path.abspath(self.paths[0]) if self.paths else None
        self.initial = _fingerprint(self.paths)

    def changed(self, wanted: dict[str, Want] | None = None) -> bool:
        """The files changed, or a waiting call runs with another configuration file."""
        if self.config and any(w.config and w.config != self.config for w in (wanted or {}).values()):
            return True
        return _fingerprint(self.paths) != self.initial


class Pusher:
    def __init__(self, archive: WalArchive, spool: Spool, ident: ClusterIdentity, *, parallel: int = 4,
                 idle_exit: float = 30.0, stall_after: float = 600.0, watch: Watch | None = None,
                 orphan_exit: float = 60.0):
        self.archive = archive
        self.spool = spool
        self.ident = ident
        self.parallel = max(1, parallel)
        self.idle_exit = idle_exit
        self.orphan_exit = orphan_exit
        self.stall_after = stall_after
        self.pg_wal = spool.data_dir / "pg_wal"
        self.status_dir = self.pg_wal / "archive_status"
        self.pool = ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="push")
        self.inflight: dict[str, tuple[Future, float]] = {}
        self.stored: set[str] = set()
        self.retry_at: dict[str, tuple[int, float, float]] = {}  # name -> (failures, next try, last failure)
        self.pushed = 0
        self.watch = watch or Watch()
        self.retired: str | None = None

    # -- one pass
    def ready(self) -> list[str]:
        try:
            return [n[:-6] for n in os.listdir(self.status_dir) if n.endswith(".ready")]
        except FileNotFoundError:
            return []

    def pending(self, ready: list[str], wanted: dict[str, Want]) -> list[tuple[str, str]]:
        now = time.time()
        work = {n: str(self.pg_wal / n) for n in ready}
        work.update({n: w.path for n, w in wanted.items()})
        out = []
        for name in sorted(work, key=push_order):
            if name in self.inflight or (name in self.stored and name not in wanted):
                continue
            if self.spool.is_stored(name, work[name]):
                self.stored.add(name)
                continue
            failures, next_try, last_fail = self.retry_at.get(name, (0, 0.0, 0.0))
            asked = wanted[name].asked if name in wanted else 0.0
            if failures and now < next_try and asked <= last_fail:
                continue
            out.append((name, work[name]))
        return out

    def _one(self, name: str, path: str) -> None:
        st = os.stat(path)
        res = self.archive.push(path, self.ident)
        self.spool.record_stored(name, st, res.sha256, res.key)
        verb = "already archived" if res.already_archived else "archived"
        log.event(_log, logging.INFO, f"{verb} {name}", bytes=res.size, stored=res.stored_bytes,
                  seconds=round(res.seconds, 3))

    def harvest(self) -> None:
        for name, (fut, _started) in list(self.inflight.items()):
            if not fut.done():
                continue
            del self.inflight[name]
            exc = fut.exception()
            if exc is None:
                self.stored.add(name)
                self.retry_at.pop(name, None)
                self.pushed += 1
                continue
            err = exc if isinstance(exc, DbopsError) else DbopsError(
                f"pushing {name} failed: {type(exc).__name__}: {exc}")
            if isinstance(exc, FileNotFoundError):
                err = NotFoundError(f"WAL file {name} disappeared before it was archived")
            self.spool.record_failure(name, err)
            failures = self.retry_at.get(name, (0, 0.0, 0.0))[0] + 1
            cap = 60.0 if int(err.exit_code) == 13 else 10.0
            now = time.time()
            self.retry_at[name] = (failures, now + min(0.5 * 2 ** failures, cap), now)
            log.event(_log, logging.WARNING, f"pushing {name} failed: {err.message}", detail=err.detail or "",
                      attempt=failures)

    def stalled(self) -> list[str]:
        now = time.monotonic()
        return [n for n, (f, t) in self.inflight.items() if not f.done() and now - t > self.stall_after]

    def step(self) -> bool:
        """One pass; returns whether there is work in progress or waiting."""
        self.harvest()
        ready = self.ready()
        wanted = self.spool.wanted()
        if not self.retired and self.watch.changed(wanted):
            self.retired = "the configuration changed (or a caller uses another one)"
        if self.retired:  # finish what runs, start nothing new
            return bool(self.inflight)
        for name, path in self.pending(ready, wanted):
            if len(self.inflight) >= self.parallel:
                break
            self.inflight[name] = (self.pool.submit(self._one, name, path), time.monotonic())
        return bool(self.inflight or wanted or any(n not in self.stored for n in ready))

    # -- the loop
    def run(self) -> int:
        idle_since = server_seen = time.monotonic()
        last_prune = 0.0
        last_beat = 0.0
        postmaster = self.spool.data_dir / "postmaster.pid"
        while self.status_dir.is_dir():
            now = time.monotonic()
            if postmaster.exists():
                server_seen = now
            elif now - server_seen > self.orphan_exit:
                self.retired = "PostgreSQL is not running"  # its next archive_command starts a pusher
            if now - last_beat > 1.0:
                self.spool.beat()
                last_beat = now
            busy = self.step()
            if self.retired and not self.inflight:
                _log.info("pusher retiring: %s", self.retired)
                break
            stuck = self.stalled()
            if stuck:
                for name in stuck:
                    self.spool.record_failure(name, DbopsError(
                        f"uploading {name} hung for more than {self.stall_after:.0f} s; the pusher restarts"))
                _log.error("uploads hung (%s); exiting so a fresh pusher takes over", ", ".join(stuck))
                return 3
            if busy:
                idle_since = now
            elif now - idle_since > self.idle_exit or now - idle_since > 1.0 and now != server_seen:
                break
            if now - last_prune > 5.0:
                keep = set(self.ready()) | set(self.spool.wanted()) | set(self.inflight)
                self.spool.prune(keep, older_than=5.0)
                self.stored &= keep
                last_prune = now
            time.sleep(0.02 if self.inflight else 0.1)
        self.pool.shutdown(wait=True)
        self.harvest()
        _log.info("pusher exiting after %d upload(s)", self.pushed)
        return 0


class Prefetcher:
    def __init__(self, archive: WalArchive, spool: Spool, folder: Path, *, depth: int, parallel: int = 4,
                 idle_exit: float = 30.0, seg_size: int = DEFAULT_SEGMENT_SIZE, watch: Watch | None = None):
        self.archive = archive
        self.spool = spool
        self.folder = folder
        self.depth = depth
        self.seg_size = seg_size
        self.idle_exit = idle_exit
        self.pool = ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="prefetch")
        self.inflight: dict[str, Future] = {}
        self.retry_at: dict[str, float] = {}  # name -> when to try again (not archived yet, or failed)
        self.watch = watch or Watch()

    def window(self, want: str | None) -> list[str]:
        if not want or not SEGMENT_RE.match(want):
            return []
        out, name = [], want
        for _ in range(self.depth):
            name = next_segment(name, self.seg_size)
            out.append(name)
        return out

    def harvest(self) -> None:
        for name, fut in list(self.inflight.items()):
            if fut.done():
                del self.inflight[name]
                exc = fut.exception()
                if isinstance(exc, NotFoundError):  # not archived yet: ask again soon
                    self.retry_at[name] = time.monotonic() + 2.0
                elif exc is not None:
                    _log.warning("prefetching %s failed: %s", name, getattr(exc, "message", exc))
                    self.retry_at[name] = time.monotonic() + 15.0

    def step(self, want: str | None) -> None:
        self.harvest()
        window = self.window(want)
        keep = set(window)
        for e in os.scandir(self.folder):
            if not e.name.startswith(".") and e.name not in keep:
                Path(e.path).unlink(missing_ok=True)
        now = time.monotonic()
        for name in window:
            if name in self.inflight or (self.folder / name).exists():
                continue
            if now < self.retry_at.get(name, 0.0):
                break  # the end of the archive (or trouble): nothing beyond it either
            self.inflight[name] = self.pool.submit(self.archive.fetch, name, self.folder / name)

    def run(self) -> int:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        for e in os.scandir(self.folder):  # leftovers of a killed download
            if e.name.startswith("."):
                Path(e.path).unlink(missing_ok=True)
        last_want, changed = None, time.monotonic()
        postmaster = self.spool.data_dir / "postmaster.pid"
        while self.spool.data_dir.is_dir() and not self.watch.changed():
            want = self.spool.prefetch_want()
            now = time.monotonic()
            if want != last_want:
                last_want, changed = want, now
            if now - changed > self.idle_exit or (now - changed > 2.0 and not postmaster.exists()):
                # nobody asks any more (or the server is gone): finish what runs, start nothing new
                self.harvest()
                if not self.inflight:
                    break
            else:
                self.step(want)
            time.sleep(0.05 if self.inflight else 0.2)
        self.pool.shutdown(wait=True)
        return 0


def main(argv: list[str] | None = None) -> int:
    from dbops import config as cfgmod
    from dbops.pg.walfile import cluster_identity
    from dbops.ops.wal.spool import spool_for
    from dbops.storage import open_archive

    ap = argparse.ArgumentParser(prog="dbops-walworker")
    ap.add_argument("which", choices=(PUSHER, PREFETCHER))
    ap.add_argument("--config", required=True)
    ap.add_argument("--data-dir", required=True)
    args = ap.parse_args(argv)
    log.setup("text", 1)
    data_dir = Path(args.data_dir)
    try:
        cfg = cfgmod.load(args.config)
        spool = spool_for(cfg.archive, data_dir, cfg.storage).ensure()
        fd = spool.try_lock(args.which)
        if fd is None:
            return 0  # another one runs for this data folder
        enc = cfg.storage.encryption
        files = [cfg.storage.credentials_file, enc.key_file, *enc.old_key_files]
        watch = Watch([Path(args.config)] + [Path(f) for f in files if f])  # a change (key rotation): restart
        archive = WalArchive(*open_archive(cfg.storage), compression=cfg.compression,
                             cluster_name=cfg.cluster)
        if args.which == PUSHER:
            s = cfg.storage
            stall = max(cfg.archive.push_timeout, s.retry_deadline + 2 * (s.connect_timeout + s.read_timeout) + 30)
            _log.info("pusher starting for %s (pid %d)", data_dir, os.getpid())
            return Pusher(archive, spool, cluster_identity(data_dir), parallel=cfg.archive.parallel,
                          stall_after=stall, watch=watch).run()
        owner = archive.read_identity()
        seg_size = owner.wal_segment_size if owner else DEFAULT_SEGMENT_SIZE
        return Prefetcher(archive, spool, spool.prefetch_dir(cfg.storage), depth=cfg.archive.prefetch,
                          parallel=cfg.archive.parallel, seg_size=seg_size, watch=watch).run()
    except DbopsError as e:
        _log.error("%s worker failed: %s", args.which, e.render())
        return int(e.exit_code)


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    os._exit(code)  # a hung upload thread must not keep the process alive
