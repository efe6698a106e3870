"""The cluster-wide lock (an object in S3) plus a host-local flock.

Protocol, using only what every S3-compatible store offers (conditional create):

* acquire: ``put(lock, owner, if_absent=True)``; success means we hold it.
* held by someone else and fresh: ``LockedError`` naming the owner and since when.
* expired (not renewed for ``ttl`` seconds, judged on the *server's* clock: the lock
  object's Last-Modified against the server's Date): exactly one contender may replace
  that generation, the one whose ``put(takeover marker for the old token, if_absent=True)``
  succeeds. It re-reads the lock (still the expired generation?), overwrites it, waits
  ``settle`` seconds, and re-reads to confirm it is the owner; anything else backs off.
* heartbeat: a thread re-reads (still ours?) and rewrites the lock every ``ttl/3``, conditionally
  (``If-Match`` the ETag it read), so a renewal can never overwrite a takeover.
* :meth:`ClusterLock.check` raises once the lock is lost, and renews synchronously first when the
  last renewal is older than the heartbeat (a process stopped past the TTL and continued finds out
  before its next step). :class:`dbops.storage.guard.GuardedStore` calls it before every write and delete of a run.
* same host: an owner whose boot ID differs (the host rebooted) or whose PID is gone is stale.
* release: delete, only if the lock still carries our token.

Before the first lock a process takes on a store, the store must prove it honours conditional
writes (dbops.storage.probe). A host-local ``flock`` is taken first, in a folder owned by the
running user (dbops.fsafe), so two runs of one user on one host never race at all.

The owner record both hold: :mod:`dbops.storage.lockowner`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import secrets as pysecrets
import socket
import threading
import time
from pathlib import Path
from typing import Self

from dbops import log, proc
from dbops.errors import DbopsError, LockedError, NotFoundError, PreconditionError
from dbops.fsafe import open_nofollow, private_dir
from dbops.storage.base import ObjectInfo, ObjectStore
from dbops.storage.layout import Layout
from dbops.storage.lockowner import LockOwner, boot_id, default_local_dir, iso_utc
from dbops.storage.probe import require_conditional_writes

# The cluster's locks, by name.
BACKUP = "backup"  # `dbops backup` and `backup prune`: one catalog writer at a time
SWITCH = "switch"  # `dbops failover`, and a backup while it captures its target: they never interleave

_log = log.get("lock")

DEFAULT_TTL = 120.0
CLOCK_MARGIN = 1.0  # S3 timestamps have one-second resolution
_ATTEMPTS = 5


def _store_identity(store: ObjectStore) -> str:
    store = getattr(store, "inner", store)  # a GuardedStore: the store it guards
    settings = getattr(store, "s", None)
    endpoint = getattr(settings, "endpoint", None) or ""
    return f"{type(store).__name__}:{endpoint}:{getattr(store, 'bucket', '') or getattr(store, 'root', '')}"


class ClusterLock:
    """``with ClusterLock(store, layout, "cluster", command="backup"):`` ... (re-entrant: no)."""

    def __init__(
        self,
        store: ObjectStore,
        layout: Layout,
        name: str = "cluster",
        *,
        command: str,
        ttl: float = DEFAULT_TTL,
        heartbeat: float | None = None,
        settle: float = 2.0,
        local_dir: str | None = None,
        host: str | None = None,
        os_user: str = "postgres",
    ):
        self.store, self.layout, self.name = store, layout, name
        self.key = layout.lock(name)
        self.command = command
        self.ttl = ttl
        self.heartbeat = heartbeat if heartbeat is not None else ttl / 3
        self.settle = settle
        self.host = host or socket.gethostname()
        self.os_user = os_user  # the PostgreSQL OS user, who may share the host lock folder with root
        digest = hashlib.sha256(f"{_store_identity(store)}|{self.key}".encode()).hexdigest()[:16]
        self.local_path = Path(local_dir or default_local_dir()) / f"dbops-{name}-{digest}.lock"
        self.owner: LockOwner | None = None
        self._local_fd: int | None = None
        self._local_rw = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None
        self._renew_lock = threading.Lock()
        self._renewed = 0.0  # monotonic time of the last confirmed renewal (or acquisition)
        self._boot_id = boot_id()

    # ------------------------------------------------------------------ context manager

    def __enter__(self) -> Self:
        self.acquire()
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"dbops-lock-{self.name}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
            self._thread = None
        self.release()

    # ------------------------------------------------------------------ public

    def acquire(self) -> LockOwner:
        self._lock_local()
        try:
            require_conditional_writes(self.store, self.layout)
            owner = self._acquire_remote()
            self._renewed = time.monotonic()
            return owner
        except BaseException:
            self._unlock_local()
            raise

    def refresh(self) -> None:
        """Renew our lock, only while it is still the object we read (If-Match its ETag);
        LockedError when it is no longer ours."""
        assert self.owner is not None, "refresh() before acquire()"
        with self._renew_lock:
            if self._lost:
                raise self._lost_error()
            cur, info = self._read()
            if cur is None or info is None or cur.token != self.owner.token:
                self._lost = f"now held by {cur.describe()}" if cur else "the lock object is gone"
                raise self._lost_error()
            renewed = dataclasses.replace(self.owner, expires=time.time() + self.ttl)
            if not self.store.put(self.key, renewed.to_bytes(), if_match=info.etag):
                cur, _ = self._read()
                if cur == renewed:  # our renewal was stored and its answer lost (the retry met it)
                    self.owner = renewed
                    self._renewed = time.monotonic()
                    return
                self._lost = (f"replaced while it was being renewed, now held by {cur.describe()}" if cur
                              else "replaced while it was being renewed")
                raise self._lost_error()
            self.owner = renewed
            self._renewed = time.monotonic()

    def check(self) -> None:
        """Raise LockedError once the lock is lost. Call before every destructive step: when the
        last renewal is older than the heartbeat (this process may have been stopped), it renews
        first, so a run that lost the lock while it was not running stops before acting."""
        if self._lost:
            raise self._lost_error()
        if self.owner is None:
            return
        age = time.monotonic() - self._renewed
        if age <= self.heartbeat * 1.5:
            return
        try:
            self.refresh()
        except LockedError:
            raise
        except DbopsError as e:
            if age > self.ttl:
                self._lost = f"not renewed for {age:.0f} s ({e.message})"
                raise self._lost_error() from None

    def release(self) -> None:
        try:
            if self.owner is not None:
                cur, _ = self._read()
                if cur is not None and cur.token == self.owner.token:
                    self.store.delete(self.key)
        finally:
            self.owner = None
            self._unlock_local()

    # ------------------------------------------------------------------ remote

    def _new_owner(self) -> LockOwner:
        now = time.time()
        return LockOwner(self.host, os.getpid(), self.command, now, now + self.ttl, self.ttl,
                         pysecrets.token_hex(16), self._boot_id)

    def _read(self) -> tuple[LockOwner | None, ObjectInfo | None]:
        info = self.store.head(self.key)
        if info is None:
            return None, None
        try:
            data = self.store.get(self.key)
        except NotFoundError:
            return None, None
        return LockOwner.from_bytes(data), info

    def stale(self, cur: LockOwner | None, info: ObjectInfo) -> bool:
        """Whether a lock held by `cur` (stored as `info`) may be taken over: its owner is gone, or it expired."""
        if cur is not None and cur.host == self.host:
            if cur.boot_id and self._boot_id and cur.boot_id != self._boot_id:
                return True  # taken before this host rebooted: its owner cannot be running
            if cur.pid != os.getpid() and not proc.pid_alive(cur.pid) and (
                    not cur.boot_id or cur.boot_id == self._boot_id):
                return True  # same boot, and that process is gone (SIGKILL, crash)
        now = self.store.server_time() or time.time()
        ttl = cur.ttl if cur else self.ttl
        return now > info.last_modified + ttl + CLOCK_MARGIN

    def _confirm(self, me: LockOwner) -> bool:
        cur, _ = self._read()
        return cur is not None and cur.token == me.token

    def _acquire_remote(self) -> LockOwner:
        cur: LockOwner | None = None
        for _ in range(_ATTEMPTS):
            me = self._new_owner()
            if self.store.put(self.key, me.to_bytes(), if_absent=True):
                self.owner = me
                _log.debug("acquired lock %s", self.key)
                return me
            cur, info = self._read()
            if info is None:
                continue  # released between our put and our read
            if cur is not None and cur.token == me.token:  # our put was stored, its answer lost
                self.owner = me
                return me
            if not self.stale(cur, info):
                raise self._held_error(cur)
            taken = self._take_over(cur, info)
            if taken:
                return taken
            time.sleep(0.05 + pysecrets.randbelow(100) / 1000)
        raise self._held_error(cur)

    def _take_over(self, stale: LockOwner | None, info: ObjectInfo) -> LockOwner | None:
        generation = stale.token if stale else hashlib.sha256(
            f"{info.etag}|{info.last_modified}|{info.size}".encode()).hexdigest()[:32]
        marker = self.layout.lock_takeover(self.name, generation)
        me = self._new_owner()
        if not self.store.put(marker, me.to_bytes(), if_absent=True):
            return None  # another process is taking this generation over
        try:
            cur, info2 = self._read()
            if info2 is None:
                return None  # released meanwhile: the caller retries a plain acquire
            if (cur.token if cur else None) != (stale.token if stale else None):
                return None  # replaced since we looked
            _log.warning("taking over expired lock %s%s", self.key, f" from {stale.describe()}" if stale else "")
            if not self.store.put(self.key, me.to_bytes(), if_match=info2.etag):
                return None  # renewed or replaced between our read and our write
            time.sleep(self.settle)
            if not self._confirm(me):
                return None
            self.owner = me
            return me
        finally:
            self.store.delete(marker)

    # ------------------------------------------------------------------ heartbeat

    def _beat(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.heartbeat):
            try:
                self.refresh()
                last_ok = time.monotonic()
            except LockedError:
                _log.error("lost lock %s: %s", self.key, self._lost)
                return
            except DbopsError as e:
                _log.warning("could not renew lock %s: %s", self.key, e.message)
                if time.monotonic() - last_ok > self.ttl:
                    self._lost = f"not renewed for {self.ttl:.0f} s ({e.message})"
                    return

    # ------------------------------------------------------------------ local flock

    def _lock_local(self) -> None:
        # The folder may be shared by runs as root and as the PostgreSQL user (both own it safely);
        # a lock file the other one created is flocked read-only (flock needs no write access).
        try:
            private_dir(self.local_path.parent, create=True, also_user=self.os_user)
            try:
                fd = open_nofollow(self.local_path, os.O_RDWR | os.O_CREAT, 0o644)
                self._local_rw = True
            except PermissionError:
                fd = open_nofollow(self.local_path, os.O_RDONLY)
                self._local_rw = False
        except OSError as e:  # a full or read-only lock folder: nothing taken, nothing left open
            raise PreconditionError(
                f"cannot take the host lock {self.name}: {e.filename or self.local_path}: {e.strerror or e}",
                detail=f"local lock folder {self.local_path.parent}",
                hint="free space in that folder (a full /run?) or point DBOPS_LOCK_DIR at a folder of this "
                     "user's own on another filesystem",
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = LockOwner.from_bytes(os.pread(fd, 4096, 0))
            os.close(fd)
            raise LockedError(
                f"lock {self.name} is held on this host by "
                + (holder.describe() if holder else "another dbops run"),
                detail=f"local lock file {self.local_path}",
                hint="wait for that run to finish",
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._local_fd = fd  # held from here on: released by _unlock_local whatever follows
        if self._local_rw:
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, self._new_owner().to_bytes(), 0)
            except OSError as e:  # the flock is what excludes; the owner record only names the holder
                _log.warning("host lock %s taken, but its owner record could not be written (%s): another run "
                             "on this host will not see who holds it", self.local_path, e.strerror or e)

    def _unlock_local(self) -> None:
        if self._local_fd is not None:
            if self._local_rw:
                os.ftruncate(self._local_fd, 0)
            os.close(self._local_fd)  # closing releases the flock; the file stays (unlinking would race)
            self._local_fd = None

    # ------------------------------------------------------------------ errors

    def _held_error(self, cur: LockOwner | None) -> LockedError:
        if cur is None:
            return LockedError(f"lock {self.name} is held (owner unreadable)", detail=f"object {self.key}",
                               hint="it is taken over automatically once it expires")
        return LockedError(
            f"lock {self.name} is held by {cur.describe()}",
            detail=f"object {self.key}; expires {iso_utc(cur.expires)} unless its owner renews it",
            hint="wait for that run to finish; if its owner died, the lock is taken over once it expires",
        )

    def _lost_error(self) -> LockedError:
        return LockedError(f"lock {self.name} was lost: {self._lost}",
                           hint="another run took it over after it expired; stop and check what it did")
