"""Issue 13 items 4, 5, 11, 12 on LocalStore (real files, no fakes of the code under test):
conditional writes proven, a renewal that cannot overwrite a takeover, a paused run that finds out
before its next write, boot ID in the same-host stale check, the host lock file private, an
identical manifest after a lost answer, and status records appended in order whatever the clock."""

from __future__ import annotations

import os
import time

import pytest

from dbops.errors import ConflictError, ExitCode, LockedError, PreconditionError
from dbops.repo import catalog
from dbops.storage.guard import GuardedStore
from dbops.storage.layout import Layout
from dbops.storage.local import LocalStore
from dbops.storage.lock import ClusterLock
from dbops.storage.lockowner import LockOwner, boot_id, read_owner
from dbops.storage.probe import conditional_writes_refused, require_conditional_writes


class IgnoresIfNoneMatch(LocalStore):
    """A store that overwrites where it should refuse (what a header-stripping proxy makes of S3)."""

    def put(self, key, data, **kw):
        kw.pop("if_absent", None)
        return super().put(key, data, **kw)


class LosesAnswers(LocalStore):
    """The first put of each key is stored but reported refused, as a retry after a lost answer sees it."""

    def __init__(self, root):
        super().__init__(root)
        self.seen: set[str] = set()

    def put(self, key, data, **kw):
        ok = super().put(key, data, **kw)
        if key not in self.seen and ok:
            self.seen.add(key)
            return super().put(key, data, **kw)  # the retry: refused (if_absent), the object is ours
        return ok


@pytest.fixture
def env(tmp_path):
    return LocalStore(tmp_path / "s"), Layout("p"), tmp_path


def test_a_store_that_ignores_conditional_writes_is_refused_with_exit_11(tmp_path):
    good, bad = LocalStore(tmp_path / "good"), IgnoresIfNoneMatch(tmp_path / "bad")
    assert conditional_writes_refused(good, Layout("p"))
    assert not conditional_writes_refused(bad, Layout("p"))
    with pytest.raises(PreconditionError) as ei:
        require_conditional_writes(bad, Layout("p"))
    assert ei.value.exit_code == ExitCode.PRECONDITION and str(tmp_path / "bad") in ei.value.message
    with pytest.raises(PreconditionError):  # the lock, too, refuses to run on it
        ClusterLock(bad, Layout("p"), command="backup", local_dir=str(tmp_path / "l")).acquire()
    assert not list((tmp_path / "bad" / "objects").rglob("*.lock"))


def test_a_renewal_never_overwrites_a_takeover(env):
    store, layout, tmp = env
    key = layout.lock("cluster")
    b_owner = LockOwner("B", 1, "backup B", time.time(), time.time() + 60, 60, "b" * 32)

    class TakeoverBeforeRenewal:
        """The store as A sees it: B takes over between A's read and A's (conditional) write."""

        armed = False

        def put(self, k, data, **kw):
            if self.armed and k == key and kw.get("if_match"):
                store.put(key, b_owner.to_bytes())
            return store.put(k, data, **kw)

        def __getattr__(self, name):
            return getattr(store, name)

    seen = TakeoverBeforeRenewal()
    a = ClusterLock(seen, layout, command="backup A", local_dir=str(tmp / "la"), host="A")
    a.acquire()
    info = store.head(key)
    seen.armed = True  # A's conditional put must be refused
    with pytest.raises(LockedError):
        a.refresh()
    seen.armed = False
    assert read_owner(store, layout, "cluster").token == b_owner.token and info is not None


def test_a_paused_run_finds_out_before_its_next_write(env):
    store, layout, tmp = env
    a = ClusterLock(store, layout, command="backup A", local_dir=str(tmp / "la"), host="A", ttl=3, heartbeat=0.2)
    a.acquire()  # no heartbeat thread: as if the process had been stopped
    guarded = GuardedStore(store, a)
    guarded.put("p/x", b"allowed while held")
    key = layout.lock("cluster")
    t = time.time() - 10
    os.utime(store.path_of(key), (t, t))  # expired
    b = ClusterLock(store, layout, command="backup B", local_dir=str(tmp / "lb"), host="B", ttl=3, settle=0)
    b.acquire()
    time.sleep(0.35)  # it was stopped for longer than the heartbeat
    with pytest.raises(LockedError) as ei:
        guarded.put("p/y", b"must not be written")
    assert "backup B" in ei.value.message and store.head("p/y") is None
    with pytest.raises(LockedError):
        guarded.delete("p/x")
    assert store.head("p/x") is not None and read_owner(store, layout, "cluster").host == "B"


def test_same_host_stale_check_compares_the_boot_id(env):
    store, layout, tmp = env
    me = ClusterLock(store, layout, command="backup", local_dir=str(tmp / "l"), host="H")
    alive = LockOwner("H", os.getppid(), "backup", time.time(), time.time() + 60, 60, "t" * 32, "another-boot")
    info = store.head(layout.lock("cluster")) or type("I", (), {"last_modified": time.time()})()
    assert me.stale(alive, info)  # a PID from before a reboot means nothing
    same_boot = LockOwner("H", os.getppid(), "backup", time.time(), time.time() + 60, 60, "t" * 32, boot_id())
    assert not me.stale(same_boot, info)


def test_the_host_lock_file_is_private_and_never_followed(env):
    store, layout, tmp = env
    lock_dir = tmp / "l"
    lock_dir.mkdir(mode=0o777)
    os.chmod(lock_dir, 0o777)
    with pytest.raises(PreconditionError, match="writable by other users"):
        ClusterLock(store, layout, command="backup", local_dir=str(lock_dir)).acquire()
    os.chmod(lock_dir, 0o700)
    c = ClusterLock(store, layout, command="backup", local_dir=str(lock_dir))
    (tmp / "victim").write_text("x")
    os.symlink(tmp / "victim", c.local_path)
    with pytest.raises(PreconditionError, match="symbolic link"):
        c.acquire()
    assert (tmp / "victim").read_text() == "x"
    os.unlink(c.local_path)
    with c:
        assert os.stat(c.local_path).st_mode & 0o022 == 0  # readable (flock), writable by its owner only


def test_an_identical_manifest_after_a_lost_answer_is_success(tmp_path):
    from test_backup_store import make_datadir, snapshot

    from dbops.repo import manifest as mf

    store, layout = LosesAnswers(tmp_path / "s"), Layout("p")
    m = snapshot(store, layout, make_datadir(tmp_path), "b1")
    assert mf.load(store, layout, "b1").backup_id == "b1"
    other = mf.load(store, layout, "b1")
    other.meta = {"different": True}
    with pytest.raises(ConflictError):
        mf.save(LocalStore(tmp_path / "s"), layout, other)
    assert m.backup_id == "b1"


def test_status_records_append_in_order_whatever_the_clock(env):
    from test_backup_store import make_datadir, snapshot

    store, layout, tmp = env
    snapshot(store, layout, make_datadir(tmp), "b1")
    catalog.record_status(store, layout, "b1", catalog.STORED, run_id="r1")

    class SlowClock(LocalStore):
        def server_time(self):
            return time.time() - 3600  # an hour behind

    late = SlowClock(tmp / "s")
    catalog.record_status(late, layout, "b1", catalog.FAILED, run_id="r2", reason="later, on a slow clock")
    assert catalog.latest_status(store, layout, "b1").state == catalog.FAILED
    assert [s.run_id for s in catalog.statuses(store, layout, "b1")] == ["r1", "r2"]


def test_a_scratch_folder_planted_by_another_user_is_refused(tmp_path):
    from dbops.runtime.scratch import scratch_folder

    planted = tmp_path / "scratch"
    planted.mkdir()
    os.chmod(planted, 0o777)
    with pytest.raises(PreconditionError, match="writable by other users"):
        with scratch_folder(planted, "r1", "postgres"):
            pass
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(PreconditionError, match="symbolic link"):
        with scratch_folder(link, "r1", "postgres"):
            pass
    assert not list((tmp_path / "elsewhere").iterdir())
    fresh = tmp_path / "fresh" / "scratch"
    with scratch_folder(fresh, "r1", "postgres") as d:
        assert d.parent == fresh and os.stat(fresh).st_mode & 0o022 == 0
    assert not list(fresh.iterdir())
