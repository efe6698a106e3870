"""Cluster lock on LocalStore: contention names the owner, the host flock, stale takeover by
exactly one of two racing threads, heartbeat, and a lost lock noticed."""

from __future__ import annotations

import os
import threading
import time

import pytest

from dbops.errors import ExitCode, LockedError, PreconditionError
from dbops.storage.lock import ClusterLock
from dbops.storage.lockowner import LockOwner, read_owner
from dbops.storage.layout import Layout
from dbops.storage.local import LocalStore
from diskfill import fill_up, needs_root, tmpfs


@pytest.fixture
def env(tmp_path):
    return LocalStore(tmp_path / "s"), Layout("p"), tmp_path


def lock(env, host, **kw):
    store, layout, tmp = env
    kw.setdefault("command", f"backup on {host}")
    return ClusterLock(store, layout, "cluster", host=host, local_dir=str(tmp / f"locks-{host}"), **kw)


def plant_stale(env, age: float = 600.0, ttl: float = 60.0) -> LockOwner:
    """A lock left by a run that died `age` seconds ago."""
    store, layout, _ = env
    t = time.time() - age
    dead = LockOwner("deadhost", 4242, "backup", t, t + ttl, ttl, "dead" * 8)
    key = layout.lock("cluster")
    store.put(key, dead.to_bytes())
    os.utime(store.path_of(key), (t, t))
    return dead


def test_acquire_release_and_contention_names_the_owner(env):
    store, layout, _ = env
    a = lock(env, "hostA")
    with a:
        owner = read_owner(store, layout, "cluster")
        assert owner.host == "hostA" and owner.pid == os.getpid() and owner.command == "backup on hostA"
        with pytest.raises(LockedError) as ei:
            lock(env, "hostB").acquire()
        e = ei.value
        assert e.exit_code == ExitCode.LOCKED
        assert "backup on hostA" in e.message and "hostA" in e.message and "since" in e.message
        assert "expires" in e.detail
    assert read_owner(store, layout, "cluster") is None
    with lock(env, "hostB"):  # free again
        pass


def test_two_runs_on_one_host_are_stopped_by_the_local_flock(env):
    store, layout, tmp = env
    a = ClusterLock(store, layout, "cluster", command="backup", local_dir=str(tmp / "l"))
    b = ClusterLock(store, layout, "cluster", command="failover", local_dir=str(tmp / "l"))
    with a:
        with pytest.raises(LockedError) as ei:
            b.acquire()
        assert "on this host" in ei.value.message and "'backup'" in ei.value.message
    b.acquire()
    b.release()


def test_fresh_lock_is_not_taken_over(env):
    plant_stale(env, age=5.0, ttl=60.0)
    with pytest.raises(LockedError) as ei:
        lock(env, "hostA").acquire()
    assert "deadhost" in ei.value.message


def test_stale_lock_is_taken_over_by_exactly_one_of_two_racing_threads(env):
    store, layout, _ = env
    for round_ in range(8):
        plant_stale(env)
        contenders = [lock(env, f"h{round_}a", settle=0.2), lock(env, f"h{round_}b", settle=0.2)]
        barrier = threading.Barrier(2)
        results: dict[str, object] = {}

        def run(lk, barrier=barrier, results=results):
            barrier.wait()
            try:
                results[lk.host] = lk.acquire()
            except LockedError as e:
                results[lk.host] = e

        threads = [threading.Thread(target=run, args=(lk,)) for lk in contenders]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [h for h, r in results.items() if isinstance(r, LockOwner)]
        assert len(winners) == 1, results
        assert read_owner(store, layout, "cluster").host == winners[0]
        loser = next(r for r in results.values() if isinstance(r, LockedError))
        assert "deadhost" in loser.message or winners[0] in loser.message
        for lk in contenders:
            if lk.owner:
                lk.release()
        assert read_owner(store, layout, "cluster") is None
        # Takeover markers are cleaned up.
        assert not [o.key for o in store.list(layout.root + "locks/") if ".takeover" in o.key]


def test_heartbeat_keeps_the_lock_fresh(env):
    with lock(env, "hostA", ttl=1.0, heartbeat=0.2) as a:
        time.sleep(2.6)  # well past ttl + margin: only the heartbeat keeps it
        with pytest.raises(LockedError):
            lock(env, "hostB", ttl=1.0).acquire()
        a.check()


def test_lost_lock_is_noticed_and_the_new_owner_kept(env):
    store, layout, _ = env
    with lock(env, "hostA", ttl=3.0, heartbeat=0.1) as a:
        other = LockOwner("hostB", 1, "failover", time.time(), time.time() + 60, 60, "b" * 32)
        store.put(layout.lock("cluster"), other.to_bytes())  # as if hostB had taken it over
        deadline = time.time() + 3
        while time.time() < deadline and not a._lost:
            time.sleep(0.05)
        with pytest.raises(LockedError) as ei:
            a.check()
        assert "lost" in ei.value.message and "hostB" in ei.value.message
    assert read_owner(store, layout, "cluster").host == "hostB"  # release left the new owner alone


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@needs_root
def test_a_full_lock_folder_still_locks_and_leaks_nothing(env, tmp_path, caplog):
    """/run is a small tmpfs: a full one must neither leave a raw OSError nor an flock held open. The
    flock excludes even when the owner record cannot be written; a folder that cannot be made is exit 11."""
    store, layout, _ = env
    with tmpfs(tmp_path / "run", 64 * 1024) as run:
        (run / "locks").mkdir()
        fill_up(run / "ballast")
        fds = _open_fds()
        first = ClusterLock(store, layout, "cluster", host="h1", command="backup", local_dir=str(run / "locks"))
        with caplog.at_level("WARNING"):
            first.acquire()
        assert "owner record could not be written" in caplog.text
        second = ClusterLock(store, layout, "cluster", host="h1", command="backup", local_dir=str(run / "locks"))
        with pytest.raises(LockedError) as ei:  # the flock still keeps a second run out
            second.acquire()
        assert "held on this host by another dbops run" in ei.value.message
        first.release()
        assert _open_fds() == fds
        second.acquire()
        second.release()
        assert _open_fds() == fds

    with tmpfs(tmp_path / "run2", 64 * 1024, inodes=1) as run:  # no inode left for the lock folder
        fds = _open_fds()
        third = ClusterLock(store, layout, "cluster", host="h1", command="backup", local_dir=str(run / "locks"))
        with pytest.raises(PreconditionError) as ei:
            third.acquire()
        assert ei.value.exit_code == ExitCode.PRECONDITION
        assert "cannot take the host lock cluster" in ei.value.message and "No space left on device" in ei.value.message
        assert "DBOPS_LOCK_DIR" in ei.value.hint
        assert _open_fds() == fds
        assert store.head(layout.lock("cluster")) is None  # nothing taken in the store either
