"""The direct copy of a data folder (dbops.ops.backup.livecopy) on a folder laid out like one:
what it leaves out, where tablespaces go, pg_control last, files copied in ranges and files that
vanish. (With a live server, under writes: tests/integration/test_backup_livecopy.py.)"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from dbops.ops.backup import livecopy
from dbops.ops.backup import tablespaces as tbs
from dbops.repo.manifest import DIR, SYMLINK
from dbops.repo.tblspc import Tablespace


@dataclass
class FakeBackup:  # what plan_copy reads of an OnlineBackup
    data_dir: Path
    tablespace_dir: str = "PG_15_202209061"


def touch(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_plan_leaves_out_what_pg_basebackup_does_and_maps_tablespaces(tmp_path):
    live, scratch = tmp_path / "live", tmp_path / "scratch"
    for name in ("PG_VERSION", "postgresql.auto.conf", "postmaster.pid", "postmaster.opts", "backup_label",
                 "tablespace_map", "standby.signal", "global/pg_control", "global/1262", "global/pg_internal.init",
                 "base/5/16384", "base/5/16384_fsm", "base/5/16390", "base/5/16390_init", "base/5/16390_vm",
                 "base/5/t3_16400", "base/5/pgsql_tmp/pgsql_tmp123.0", "pg_wal/000000010000000000000001",
                 "pg_wal/archive_status/000000010000000000000001.done", "pg_stat_tmp/global.stat",
                 "pg_replslot/s1/state", "pg_xact/0000"):
        touch(live / name)
    ts_live = tmp_path / "ts1"
    touch(ts_live / "PG_15_202209061" / "5" / "16500")
    touch(ts_live / "PG_16_202307071" / "5" / "99")  # another major version's folder: not ours
    (live / "pg_tblspc").mkdir()
    os.symlink(ts_live, live / "pg_tblspc" / "16499")
    scratch.mkdir()
    ts = tbs.ScratchTablespaces(scratch, known={16499: Tablespace(16499, "one", str(ts_live))})
    ts.prepare("postgres")
    data = scratch / "data"

    plan = livecopy.plan_copy(FakeBackup(live), data, ts, "postgres")
    copied = sorted(os.path.relpath(plan.dst(path), scratch) for path, _, _ in plan.files())
    assert copied == ["data/PG_VERSION", "data/base/5/16384", "data/base/5/16384_fsm", "data/base/5/16390_init",
                      "data/global/1262", "data/pg_xact/0000", "data/postgresql.auto.conf",
                      "tblspc/16499/PG_15_202209061/5/16500"]
    assert plan.control is not None and plan.control[1] == str(data / "global" / "pg_control")
    dirs = {os.path.relpath(plan.dst(e.path), scratch) for e in plan.listing if e.type == DIR}
    assert {"data/pg_wal", "data/pg_wal/archive_status", "data/pg_stat_tmp", "data/pg_replslot"} <= dirs
    assert "data/base/5/pgsql_tmp" not in dirs and "data/pg_replslot/s1" not in dirs
    assert [(plan.dst(e.path), e.target) for e in plan.listing if e.type == SYMLINK] == [
        (str(data / "pg_tblspc" / "16499"), str(ts.folder(16499)))]

    stats = livecopy.execute(plan, os_user="postgres", workers=2)
    assert stats.files == len(copied) + 1 and stats.vanished == 0
    assert os.readlink(data / "pg_tblspc" / "16499") == str(ts.folder(16499))
    assert (ts.folder(16499) / "PG_15_202209061" / "5" / "16500").read_bytes() == b"x"
    assert not (ts_live / "PG_15_202209061" / "5" / "16500").is_symlink()


def test_files_copied_in_ranges_and_a_vanished_file_left_out(tmp_path, monkeypatch):
    monkeypatch.setattr(livecopy, "RANGE", 8192)  # a 5-page file in 5 ranges shared by the threads
    live, scratch = tmp_path / "live", tmp_path / "scratch"
    body = os.urandom(5 * 8192 + 100)
    touch(live / "base" / "5" / "16384", body)
    touch(live / "base" / "5" / "16385", b"gone")
    touch(live / "global" / "pg_control", b"control")
    scratch.mkdir()
    ts = tbs.ScratchTablespaces(scratch)
    plan = livecopy.plan_copy(FakeBackup(live), scratch / "data", ts, "postgres")
    (live / "base" / "5" / "16385").unlink()  # dropped between the listing and the copy
    stats = livecopy.execute(plan, os_user="postgres", workers=2)
    assert (scratch / "data" / "base" / "5" / "16384").read_bytes() == body
    assert not (scratch / "data" / "base" / "5" / "16385").exists()
    assert (scratch / "data" / "global" / "pg_control").read_bytes() == b"control"
    assert stats.vanished == 1 and stats.bytes == len(body) + len(b"control")


def test_plan_names_each_file_by_its_path_in_a_backup(tmp_path):
    live, scratch = tmp_path / "live", tmp_path / "scratch"
    touch(live / "base" / "5" / "16384")
    touch(live / "global" / "pg_control")
    ts_live = tmp_path / "ts1"
    touch(ts_live / "PG_15_202209061" / "5" / "16500")
    (live / "pg_tblspc").mkdir()
    os.symlink(ts_live, live / "pg_tblspc" / "16499")
    scratch.mkdir()
    ts = tbs.ScratchTablespaces(scratch, known={16499: Tablespace(16499, "one", str(ts_live))})
    ts.prepare("postgres")
    plan = livecopy.plan_copy(FakeBackup(live), scratch / "data", ts, "postgres")
    assert sorted(path for path, _, _ in plan.files()) == [
        "base/5/16384", "pg_tblspc/16499/PG_15_202209061/5/16500"]
    # Listed as the walk of the finished copy lists them: a manifest that reads back (parents first).
    from dbops.repo.manifest import PgState
    from dbops.repo.store import store_snapshot
    from dbops.storage.layout import Layout
    from dbops.storage.local import LocalStore

    livecopy.execute(plan, os_user="postgres", workers=2)
    m = store_snapshot(LocalStore(str(tmp_path / "repo")), Layout("t"), str(scratch / "data"), backup_id="b1",
                       chunk_size=8192, pack_size=1 << 20, parallel=2, pg=PgState("15", "1", 1, 0, 0, 0.0),
                       include_wal=False, files=plan.entries(), save=False)
    assert [e.path for e in m.entries()] == [
        ".", "base", "base/5", "base/5/16384", "global", "pg_tblspc", "pg_tblspc/16499",
        "pg_tblspc/16499/PG_15_202209061", "pg_tblspc/16499/PG_15_202209061/5",
        "pg_tblspc/16499/PG_15_202209061/5/16500"]


def test_a_store_following_the_copy_stores_what_the_copy_wrote(tmp_path, monkeypatch):
    """The store of the copy started with it (livecopy.Copied): each range read once the copy has
    written it; the blocks it records are those of the finished copy, which restores byte for byte."""
    import threading

    from dbops.repo.manifest import FILE, PgState
    from dbops.repo.restore import restore_snapshot
    from dbops.repo.store import Cancelled, store_snapshot
    from dbops.storage.layout import Layout
    from dbops.storage.local import LocalStore

    monkeypatch.setattr(livecopy, "RANGE", 64 * 1024)
    live, scratch = tmp_path / "live", tmp_path / "scratch"
    bodies = {"base/5/16384": os.urandom(40 * 8192 + 100), "base/5/16385": bytes(3 * 8192) + b"tail",
              "base/1/112": b"small", "PG_VERSION": b"15\n"}
    for rel, body in bodies.items():
        touch(live / rel, body)
    touch(live / "global" / "pg_control", b"control")
    scratch.mkdir()
    plan = livecopy.plan_copy(FakeBackup(live), scratch / "data", tbs.ScratchTablespaces(scratch), "postgres")
    copied = livecopy.Copied()
    files = plan.entries()
    seen: list[tuple[str, int, int]] = []

    nice: set[int] = set()

    def ready(path: str, start: int, end: int) -> None:  # called in the store's hashing threads
        seen.append((path, start, end))
        nice.add(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        if not copied.wait(path, start, end):
            raise Cancelled("copy failed")

    store, layout = LocalStore(str(tmp_path / "repo")), Layout("t")
    result: list = []
    base = os.getpriority(os.PRIO_PROCESS, 0)

    def run_store() -> None:  # as a dbops run started under `nice -n 4`: its threads inherit that
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, base + 4))
        result.append(store_snapshot(
            store, layout, str(scratch / "data"), backup_id="b1", chunk_size=8192, pack_size=1 << 20, parallel=2,
            pg=PgState("15", "1", 1, 0, 0, 0.0), include_wal=False, live=True, files=files, ready=ready,
            nice=5))

    t = threading.Thread(target=run_store)
    t.start()
    livecopy.execute(plan, os_user="postgres", workers=2, copied=copied)
    t.join(30)
    m = result[0]
    assert {p for p, _, _ in seen} == {str(scratch / "data" / rel) for rel in bodies}
    # its threads yield the cores to the copy: 5 more than the run's own nice, never less than it
    assert nice == {min(19, base + 4 + 5)}
    got = {e.path: e for e in m.entries() if e.type == FILE}
    assert sorted(got) == sorted(bodies)
    out = tmp_path / "restored"
    restore_snapshot(store, layout, m, str(out), parallel=2, durable=False)
    for rel, body in bodies.items():
        assert (out / rel).read_bytes() == body == (scratch / "data" / rel).read_bytes()


def test_a_failed_copy_releases_the_store_following_it():
    copied = livecopy.Copied()
    copied.begin("/x/a", 1)
    copied.mark("/x/a", 0)
    assert copied.wait("/x/a", 0, 10)
    copied.fail()
    assert not copied.wait("/x/b", 0, 10)
    cancel = __import__("threading").Event()
    cancel.set()
    assert not livecopy.Copied().wait("/x/a", 0, 10, cancel)


def test_each_file_is_created_with_its_mode_before_its_ranges_even_empty_ones(tmp_path, monkeypatch):
    """Files are created as the copy goes (each just before its ranges are handed out): every planned
    file ends up there with its mode and content, empty ones (no range) and pg_control (last) too,
    and no range is written into a file that does not exist yet (O_EXCL creation never meets one)."""
    monkeypatch.setattr(livecopy, "RANGE", 8192)
    live, scratch = tmp_path / "live", tmp_path / "scratch"
    bodies = {f"base/5/{16384 + i}": os.urandom(8192 * (i % 3) + 17 * i) for i in range(12)}  # some empty
    for rel, body in bodies.items():
        touch(live / rel, body)
    os.chmod(live / "base/5/16385", 0o640)
    touch(live / "global" / "pg_control", b"control")
    scratch.mkdir()
    plan = livecopy.plan_copy(FakeBackup(live), scratch / "data", tbs.ScratchTablespaces(scratch), "postgres")
    real = livecopy._copy_range
    missing: list[str] = []

    def copy_range(src, dst, off, n):
        if not os.path.exists(dst):
            missing.append(str(dst))
        return real(src, dst, off, n)

    monkeypatch.setattr(livecopy, "_copy_range", copy_range)
    stats = livecopy.execute(plan, os_user="postgres", workers=2)
    assert not missing
    assert stats.files == len(bodies) + 1
    for rel, body in bodies.items():
        assert (scratch / "data" / rel).read_bytes() == body
        assert (scratch / "data" / rel).stat().st_mode & 0o777 == (live / rel).stat().st_mode & 0o777
    assert any(not b for b in bodies.values())
    assert (scratch / "data" / "global" / "pg_control").read_bytes() == b"control"


def test_a_range_that_fails_stops_the_copy_without_the_ranges_not_begun(tmp_path, monkeypatch):
    """The first range fails (a read error): the copy raises it without copying the rest of the folder
    first (at TB scale that would be hours with pg_backup_start held), and the store following it is
    released."""
    monkeypatch.setattr(livecopy, "RANGE", 8192)
    live, scratch = tmp_path / "live", tmp_path / "scratch"
    for i in range(50):
        touch(live / f"base/5/{16384 + i}", os.urandom(4 * 8192))
    touch(live / "global" / "pg_control", b"control")
    scratch.mkdir()
    plan = livecopy.plan_copy(FakeBackup(live), scratch / "data", tbs.ScratchTablespaces(scratch), "postgres")
    real = livecopy._copy_range
    lock = threading.Lock()
    calls = [0]

    def copy_range(src, dst, off, n):
        with lock:
            calls[0] += 1
            first = calls[0] == 1
        if first:
            raise OSError(5, "Input/output error", src)
        time.sleep(0.01)
        return real(src, dst, off, n)

    monkeypatch.setattr(livecopy, "_copy_range", copy_range)
    copied = livecopy.Copied()
    with pytest.raises(OSError, match="Input/output error"):
        livecopy.execute(plan, os_user="postgres", workers=2, copied=copied)
    assert calls[0] < 50, calls[0]  # 200 ranges planned; only those already begun ran
    assert not copied.wait("/nowhere", 0, 10)  # failed: the store following it stops waiting


class _Puts:
    def __init__(self):
        self.jobs = []

    def put(self, job):
        self.jobs.append(job)


def test_large_files_ranges_are_handed_out_side_by_side(monkeypatch):
    """A range of one large file, then one of the next (the threads' number of files at a time), so
    the threads copy different files at once; a small file is handed out at once, followed by a
    range of each large file waiting; every range of every file exactly once, each file's in order."""
    monkeypatch.setattr(livecopy, "RANGE", 10)
    pool = _Puts()
    side = livecopy._SideBySide(pool, 2)
    side.add("A", "a", 30, "A")  # 3 ranges: waits for a second large file
    assert pool.jobs == []
    side.small(("s1", "s1", 0, 5, "s1"))  # then a range of A
    side.add("B", "b", 25, "B")  # two large files: side by side until one ends
    side.add("C", "c", 11, "C")
    side.drain()
    order = [(j[0], j[2]) for j in pool.jobs]
    assert order == [("s1", 0), ("A", 0), ("A", 10), ("B", 0), ("A", 20), ("B", 10), ("B", 20), ("C", 0), ("C", 10)]
    assert [j[3] for j in pool.jobs if j[0] == "B"] == [10, 10, 5] and [j[3] for j in pool.jobs if j[0] == "C"] == [10, 1]


def test_a_copy_of_many_large_and_small_files_is_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(livecopy, "RANGE", 8192)
    live, scratch = tmp_path / "live", tmp_path / "scratch"
    bodies = {}
    for i in range(30):
        rel = f"base/5/{16384 + i}"
        bodies[rel] = os.urandom((i % 5) * 8192 + (i % 3) * 100)  # empty, small and up to 5 ranges
        touch(live / rel, bodies[rel])
    touch(live / "global" / "pg_control", b"control")
    scratch.mkdir()
    plan = livecopy.plan_copy(FakeBackup(live), scratch / "data", tbs.ScratchTablespaces(scratch), "postgres")
    copied = livecopy.Copied()
    stats = livecopy.execute(plan, os_user="postgres", workers=3, copied=copied)
    for rel, body in bodies.items():
        assert (scratch / "data" / rel).read_bytes() == body
        assert copied.wait(str(scratch / "data" / rel), 0, len(body))
    assert stats.bytes == sum(map(len, bodies.values())) + len(b"control")
