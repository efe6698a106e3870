"""The direct copy kept compact (dbops.ops.backup.copyplan, dbops.ops.backup.livecopy): its plan in
path order without a sort, the progress a reader follows (Copied) held only for the files in flight,
and the ranges handed to the threads bounded."""

from __future__ import annotations

import os
import threading
import time

import pytest

from dbops.ops.backup import livecopy
from dbops.ops.backup import tablespaces as tbs
from dbops.repo import walk
from dbops.repo.manifest import DIR, FILE, SYMLINK, path_key
from dbops.repo.tblspc import Tablespace
from test_livecopy_plan import FakeBackup, touch  # tests/unit is on sys.path (pytest's rootdir insertion)


NAMES = ["16384", "16384.1", "16384.10", "16384.2", "16384_fsm", "16384_fsm.1", "16384_vm", "1638", "16385",
         "a-b", "a.b", "a_b", "Z", "\u00e4"]


def test_the_plan_is_made_in_path_order_as_sorting_it_would_give(tmp_path, monkeypatch):
    """Made in one pass (each folder's names sorted in runs of 3 and merged), the plan lists what a
    sort by path gives: numbered segments, forks, a folder before 'a-b', an empty folder, two
    tablespaces whose OIDs sort as text, each file's source and destination by its path."""
    monkeypatch.setattr(walk, "NAMES_RUN", 3)
    live, scratch = tmp_path / "live", tmp_path / "scratch"
    for n in NAMES:
        touch(live / "base" / "5" / n)
    touch(live / "base" / "5" / "a" / "x")
    (live / "base" / "50").mkdir()  # an empty database folder
    touch(live / "global" / "pg_control")
    ts_a, ts_b = tmp_path / "ts_a", tmp_path / "ts_b"
    for ts_live in (ts_a, ts_b):
        for n in ("16500", "16500.1", "16500_fsm"):
            touch(ts_live / "PG_15_202209061" / "7" / n)
    (live / "pg_tblspc").mkdir()
    os.symlink(ts_a, live / "pg_tblspc" / "1650")
    os.symlink(ts_b, live / "pg_tblspc" / "165")
    scratch.mkdir()
    ts = tbs.ScratchTablespaces(scratch, known={1650: Tablespace(1650, "a", str(ts_a))})
    ts.prepare("postgres")
    plan = livecopy.plan_copy(FakeBackup(live), scratch / "data", ts, "postgres")
    paths = [e.path for e in plan.listing]
    assert paths == sorted(paths, key=path_key) and len(set(paths)) == len(paths)
    assert [p for p in paths if p.startswith("base/5/")] == [
        "base/5/1638", "base/5/16384", "base/5/16384.1", "base/5/16384.10", "base/5/16384.2", "base/5/16384_fsm",
        "base/5/16384_fsm.1", "base/5/16384_vm", "base/5/16385", "base/5/Z", "base/5/a",
        "base/5/a/x", "base/5/a-b", "base/5/a.b", "base/5/a_b", "base/5/\u00e4"]
    assert "base/50" in paths and "global/pg_control" not in paths
    assert paths.index("pg_tblspc/165") < paths.index("pg_tblspc/165/PG_15_202209061/7/16500_fsm") \
        < paths.index("pg_tblspc/1650")
    seg = "pg_tblspc/1650/PG_15_202209061/7/16500.1"
    assert plan.src(seg) == str(live / seg)
    assert plan.dst(seg) == str(ts.folder(1650) / "PG_15_202209061" / "7" / "16500.1")
    assert plan.dst("base/5/a/x") == str(scratch / "data" / "base" / "5" / "a" / "x")
    assert plan.order_of(plan.dst(seg)) == path_key(seg)
    assert plan.order_of(str(tmp_path / "elsewhere")) is None
    got = plan.entries()
    assert [e.path for e in got] == paths and walk.in_path_order(got) is got
    assert all((e.src == plan.dst(e.path)) == (e.type == FILE) for e in got)
    assert {e.type for e in got} == {DIR, FILE, SYMLINK} and got.files() == (len(NAMES) + 1 + 6, 6 * 1 + 15)


def test_copied_tells_each_range_across_files_finished_out_of_order():
    copied = livecopy.Copied()
    R = livecopy.RANGE
    copied.begin("/c/a", 2)
    copied.begin("/c/b", 1)
    copied.begin("/c/d", 3)
    copied.mark("/c/b", 0)  # b complete before a: still held, a is not
    assert copied.wait("/c/b", 0, 10)
    copied.mark("/c/a", R)
    assert copied.wait("/c/a", R, 2 * R) and not copied.wait("/c/a", 0, 10, _set())
    assert not copied.wait("/c/a", R - 1, R + 1, _set())  # overlaps the range not written
    done: list[bool] = []
    waiter = threading.Thread(target=lambda: done.append(copied.wait("/c/d", 0, 3 * R)))
    waiter.start()
    copied.mark("/c/a", 0)  # a and b complete: no longer held, told complete by their order
    assert copied.wait("/c/a", 0, 2 * R) and copied.wait("/c/b", 0, 1)
    assert set(copied._open) == {"/c/d"}
    assert not copied.wait("/c/e", 0, 1, _set())  # not begun (after the last complete file): not copied
    for off in (2 * R, 0, R):
        time.sleep(0.05)
        assert not done
        copied.mark("/c/d", off)
    waiter.join(5)
    assert done == [True] and not copied._open and not copied._begun
    assert copied.wait("/c/d", 0, 1) and copied.wait("/c/anything-empty", 0, 0)


def test_copied_releases_its_waiters_on_failure_or_cancel():
    copied = livecopy.Copied()
    copied.begin("/c/a", 1)
    got: list[bool] = []
    cancel = threading.Event()
    waiters = [threading.Thread(target=lambda: got.append(copied.wait("/c/a", 0, 1, cancel))),
               threading.Thread(target=lambda: got.append(copied.wait("/c/b", 0, 1)))]
    for w in waiters:
        w.start()
    cancel.set()
    waiters[0].join(5)
    assert got == [False] and waiters[1].is_alive()
    copied.fail()
    waiters[1].join(5)
    assert got == [False, False]


def _set() -> threading.Event:
    e = threading.Event()
    e.set()
    return e


def test_the_ranges_handed_out_stay_few_whatever_the_plan(tmp_path, monkeypatch):
    """The threads take ranges from a bounded window: with both threads held up, the copy does not
    create (and hand out) the rest of the folder's files meanwhile; then it copies them all."""
    monkeypatch.setattr(livecopy, "RANGE", 8192)
    monkeypatch.setattr(livecopy, "WINDOW", 3)
    live, scratch = tmp_path / "live", tmp_path / "scratch"
    for i in range(200):
        touch(live / f"base/5/{16384 + i:06d}", os.urandom(8192 + i))  # two ranges each
    touch(live / "global" / "pg_control", b"control")
    scratch.mkdir()
    plan = livecopy.plan_copy(FakeBackup(live), scratch / "data", tbs.ScratchTablespaces(scratch), "postgres")
    real, hold, held = livecopy._copy_range, threading.Event(), threading.Event()

    started, lock = [0], threading.Lock()

    def copy_range(src, dst, off, n):
        with lock:
            started[0] += 1
            if started[0] == 2:
                held.set()
        hold.wait(10)
        return real(src, dst, off, n)

    monkeypatch.setattr(livecopy, "_copy_range", copy_range)
    copied = livecopy.Copied()
    t = threading.Thread(target=lambda: livecopy.execute(plan, os_user="postgres", workers=2, copied=copied))
    t.start()
    assert held.wait(10)
    time.sleep(0.5)  # the window fills
    made = len(os.listdir(scratch / "data" / "base" / "5"))
    assert started[0] == 2 and made <= 2 + 3 * 2, made  # the two held, the window (3 a thread): not 200
    assert len(copied._open) <= made
    hold.set()
    t.join(30)
    assert not t.is_alive() and not copied._open
    for i in range(200):
        rel = f"base/5/{16384 + i:06d}"
        assert (scratch / "data" / rel).read_bytes() == (live / rel).read_bytes()
    assert copied.wait(str(scratch / "data" / "base/5/016583"), 0, 8192 + 199)


def test_a_copy_stopped_in_its_thread_skips_what_is_queued(tmp_path, monkeypatch):
    """KeyboardInterrupt (the run stopped) while the ranges are handed out: raised, waiters released,
    the threads ended, and the ranges still queued are not copied: a thread that took a range is held
    in it until the stop is recorded, with the other ranges queued behind."""
    monkeypatch.setattr(livecopy, "RANGE", 8192)
    live, scratch = tmp_path / "live", tmp_path / "scratch"
    for i in range(30):
        touch(live / f"base/5/{16384 + i}", os.urandom(3 * 8192))
    scratch.mkdir()
    plan = livecopy.plan_copy(FakeBackup(live), scratch / "data", tbs.ScratchTablespaces(scratch), "postgres")
    real, calls, stopped, count = livecopy._copy_range, [0], threading.Event(), threading.Lock()

    def copy_range(src, dst, off, n):
        with count:
            calls[0] += 1
        stopped.wait(10)
        return real(src, dst, off, n)

    class Errors(list):  # the stop recorded: the threads go on
        def append(self, e):
            super().append(e)
            stopped.set()

    real_init = livecopy._Workers.__init__

    def init(self, n, copied):
        real_init(self, n, copied)
        self.errors = Errors()

    created = [0]
    real_begin = livecopy.Copied.begin

    def begin(self, dst, ranges):
        created[0] += 1
        if created[0] == 5:
            raise KeyboardInterrupt
        real_begin(self, dst, ranges)

    monkeypatch.setattr(livecopy, "_copy_range", copy_range)
    monkeypatch.setattr(livecopy._Workers, "__init__", init)
    monkeypatch.setattr(livecopy.Copied, "begin", begin)
    copied = livecopy.Copied()
    with pytest.raises(KeyboardInterrupt):
        livecopy.execute(plan, os_user="postgres", workers=2, copied=copied)
    # 4 files x 3 ranges handed out; at most one a thread began before the stop (a thread that started
    # late begins none); without the skip all 12 are copied
    assert calls[0] <= 2
    assert not [t for t in threading.enumerate() if t.name.startswith("dbops-copy")]
    assert not copied.wait(str(scratch / "data" / "base/5/16390"), 0, 1)
