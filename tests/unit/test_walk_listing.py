"""The walk of a data folder (dbops.repo.walk) kept compact in a Listing: the same entries, in path
order, as WalkEntry objects would be, without one held per file."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from dbops.ops.backup import livecopy
from dbops.ops.backup import tablespaces as tbs
from dbops.repo import walk
from dbops.repo.manifest import DIR, FILE, SYMLINK, path_key
from dbops.repo.tblspc import Tablespace
from dbops.repo.walk import Listing, WalkEntry

SEG = "000000010000000000000002"


def touch(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def folder(tmp_path: Path) -> tuple[Path, Path]:
    data, ts = tmp_path / "data", tmp_path / "ts1"
    for name, size in (("PG_VERSION", 3), ("global/1262", 8192), ("global/pg_internal.init", 1),
                       ("base/5/16384", 16384), ("base/5/16384_fsm", 24576), ("base/5/16390", 8192),
                       ("base/5/16390_init", 0), ("base/5/16390_vm", 8192), ("base/5/pgsql_tmp/x", 1),
                       ("postmaster.pid", 1), (f"pg_wal/{SEG}", 100), ("pg_wal/000000010000000000000001", 100),
                       ("pg_wal/00000002.history", 40), ("pg_xact/0000", 10), ("pg_stat_tmp/global.stat", 1)):
        touch(data / name, b"x" * size)
    (data / "base" / "5" / "pgsql_tmp").chmod(0o700)
    touch(ts / "PG_15_202209061" / "5" / "16500", b"y" * 8192)
    (data / "pg_tblspc").mkdir()
    os.symlink(ts, data / "pg_tblspc" / "16499")
    os.symlink(data / "PG_VERSION", data / "base" / "5" / "stray")  # a link where PostgreSQL makes none
    odd = os.fsencode(str(data / "base" / "5")) + b"/odd\xff"  # a name that is not UTF-8
    Path(os.fsdecode(odd)).write_bytes(b"z" * 5)
    return data, ts


def test_a_walk_lists_what_to_back_up_in_path_order(tmp_path):
    data, ts = folder(tmp_path)
    keep = {SEG, "00000002.history"}.__contains__
    got = walk.walk(str(data), ("pg_xact/*",), keep, {16499: (str(ts), "/mnt/ts1")})
    assert isinstance(got, Listing)
    rows = [(e.path, e.type, e.size, e.target, e.src) for e in got]
    odd = os.fsdecode(b"base/5/odd\xff")
    assert rows == [
        (".", DIR, 0, None, None),
        ("PG_VERSION", FILE, 3, None, None),
        ("base", DIR, 0, None, None),
        ("base/5", DIR, 0, None, None),
        ("base/5/16384", FILE, 16384, None, None),
        ("base/5/16384_fsm", FILE, 24576, None, None),
        ("base/5/16390_init", FILE, 0, None, None),  # an unlogged relation: its _init fork only
        (odd, FILE, 5, None, None),
        ("global", DIR, 0, None, None),
        ("global/1262", FILE, 8192, None, None),
        ("pg_stat_tmp", DIR, 0, None, None),  # the folder, not its contents
        ("pg_tblspc", DIR, 0, None, None),
        ("pg_tblspc/16499", SYMLINK, 0, "/mnt/ts1", None),
        ("pg_tblspc/16499/PG_15_202209061", DIR, 0, None, str(ts / "PG_15_202209061")),
        ("pg_tblspc/16499/PG_15_202209061/5", DIR, 0, None, str(ts / "PG_15_202209061" / "5")),
        ("pg_tblspc/16499/PG_15_202209061/5/16500", FILE, 8192, None, str(ts / "PG_15_202209061" / "5" / "16500")),
        ("pg_wal", DIR, 0, None, None),
        (f"pg_wal/{SEG}", FILE, 100, None, None),  # the WAL kept, right after its folder
        ("pg_wal/00000002.history", FILE, 40, None, None),
        ("pg_xact", DIR, 0, None, None),  # its contents excluded by the pattern
    ]
    assert [e.mode for e in got][:2] == [os.stat(data).st_mode & 0o7777, os.stat(data / "PG_VERSION").st_mode & 0o7777]
    assert got[4].mtime_ns == os.stat(data / "base" / "5" / "16384").st_mtime_ns
    assert walk.in_path_order(got) is got  # already in order: not copied
    assert [path_key(e.path) for e in got] == sorted(path_key(e.path) for e in got)


def test_a_symlinked_pg_wal_becomes_a_folder_with_the_wal_kept(tmp_path):
    data = tmp_path / "data"
    touch(data / "PG_VERSION")
    touch(tmp_path / "wal" / SEG, b"w" * 10)
    os.symlink(tmp_path / "wal", data / "pg_wal")
    touch(data / "pg_xact" / "0000")
    got = [(e.path, e.type) for e in walk.walk(str(data), (), {SEG}.__contains__)]
    assert got == [(".", DIR), ("PG_VERSION", FILE), ("pg_wal", DIR), (f"pg_wal/{SEG}", FILE), ("pg_xact", DIR),
                   ("pg_xact/0000", FILE)]


def test_a_listing_gives_back_what_it_was_given():
    entries = [WalkEntry(".", DIR, 0o700, 1), WalkEntry("a", FILE, 0o600, -5, 2**40),
               WalkEntry("pg_tblspc/1", SYMLINK, 0o777, 3, target="/t"), WalkEntry("pg_tblspc/1/x", FILE, 0o600, 4, 1,
                                                                                 src="/s/x"),
               WalkEntry("both", SYMLINK, 0o777, 5, 0, "/t2", "/s2"), WalkEntry(os.fsdecode(b"\xfe"), FILE, 0, 0)]
    got = Listing(entries)
    assert len(got) == 6 and list(got) == entries and got[-1] == entries[-1] and got[2] == entries[2]
    with pytest.raises(IndexError):
        got[6]
    with pytest.raises(IndexError):
        got[-7]
    assert list(Listing()) == []


def test_entries_out_of_order_are_sorted():
    entries = [WalkEntry("b", FILE, 0, 0), WalkEntry(".", DIR, 0, 0), WalkEntry("a-b", FILE, 0, 0),
               WalkEntry("a", DIR, 0, 0), WalkEntry("a/b", FILE, 0, 0)]
    assert [e.path for e in walk.in_path_order(entries)] == [".", "a", "a/b", "a-b", "b"]
    assert [e.path for e in walk.in_path_order(Listing(entries))] == [".", "a", "a/b", "a-b", "b"]


def test_a_listing_stays_small():
    got = Listing(WalkEntry(f"base/16384/{16385 + i}_fsm", FILE, 0o600, 1_700_000_000_000_000_000 + i, 24576)
                  for i in range(100_000))
    size = sum(sys.getsizeof(a) for a in (got._paths, got._ends, got._extra, got._xends, got._type, got._mode,
                                          got._mtime, got._size))
    assert size < 100_000 * 64  # 21-byte paths and their numbers, never an object a file
    assert got[99_999] == WalkEntry("base/16384/116384_fsm", FILE, 0o600, 1_700_000_000_000_099_999, 24576)


def test_a_copy_plan_lists_its_entries_in_path_order(tmp_path):
    data, ts_live = folder(tmp_path)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    ts = tbs.ScratchTablespaces(scratch, known={16499: Tablespace(16499, "one", str(ts_live))})
    ts.prepare("postgres")

    class Backup:  # what plan_copy reads of an OnlineBackup
        data_dir = data
        tablespace_dir = "PG_15_202209061"

    plan = livecopy.plan_copy(Backup(), scratch / "data", ts, "postgres")  # type: ignore[arg-type]
    got = plan.entries()
    paths = [e.path for e in got]
    assert walk.in_path_order(got) is got and len(paths) == len(set(paths))
    assert len(got) == len(plan.listing) and [e.path for e in plan.listing] == paths
    assert "pg_tblspc/16499" in paths and "pg_tblspc/16499/PG_15_202209061/5/16500" in paths
    e = got[paths.index("base/5/16384")]
    assert (e.type, e.size, e.src) == (FILE, 16384, str(scratch / "data" / "base" / "5" / "16384"))


def test_a_listing_knows_whether_it_was_given_its_entries_in_order():
    ordered = [WalkEntry(".", DIR, 0, 0), WalkEntry("a", DIR, 0, 0), WalkEntry("a/b", FILE, 0, 0, 7),
               WalkEntry("a-b", FILE, 0, 0, 5), WalkEntry("c", SYMLINK, 0, 0, 0, "/x")]
    got = Listing(ordered)
    assert got.ordered and walk.in_path_order(got) is got
    assert got.files() == walk.file_totals(ordered) == (2, 12)
    for i, j in ((1, 2), (2, 3), (0, 4)):  # two swapped: not in order, and sorted back
        shuffled = list(ordered)
        shuffled[i], shuffled[j] = shuffled[j], shuffled[i]
        got = Listing(shuffled)
        assert not got.ordered and list(walk.in_path_order(got)) == ordered
    assert not Listing([ordered[1], ordered[1]]).ordered  # the same path twice


def test_a_tablespace_link_without_its_folder_is_recorded_as_a_link(tmp_path):
    data, ts = folder(tmp_path)
    got = {e.path: e for e in walk.walk(str(data))}
    assert got["pg_tblspc/16499"] == WalkEntry("pg_tblspc/16499", SYMLINK, got["pg_tblspc/16499"].mode,
                                               os.lstat(data / "pg_tblspc" / "16499").st_mtime_ns, target=str(ts))
    assert not any(p.startswith("pg_tblspc/16499/") for p in got)


def test_a_folders_names_sorted_in_runs_as_sorted_does(tmp_path, monkeypatch):
    names = [str(n) for n in range(60)] + [f"{n}_fsm" for n in range(0, 60, 7)] + ["é", "z", "Z", "a.1", "a"]
    for n in names:
        (tmp_path / n).write_bytes(b"")
    for raw in (b"\xff", b"\xc3", b"x\x80y"):  # not UTF-8: a surrogate sorts after "é" as a string, not as bytes
        (tmp_path / os.fsdecode(raw)).write_bytes(b"")
    want = sorted(os.listdir(tmp_path))
    for run in (1, 2, 7, 1 << 16):
        monkeypatch.setattr(walk, "NAMES_RUN", run)
        got = walk.Names(str(tmp_path))
        assert list(got) == want and list(got) == want, run  # as often as it is iterated
        assert bool(got.runs) == (run < len(want))
    (tmp_path / "empty").mkdir()
    assert list(walk.Names(str(tmp_path / "empty"))) == []


def test_a_walk_in_runs_of_names_lists_the_same(tmp_path, monkeypatch):
    data, ts = folder(tmp_path)
    keep = {SEG, "00000002.history"}.__contains__
    whole = list(walk.walk(str(data), ("pg_xact/*",), keep, {16499: (str(ts), "/mnt/ts1")}))
    monkeypatch.setattr(walk, "NAMES_RUN", 2)
    assert list(walk.walk(str(data), ("pg_xact/*",), keep, {16499: (str(ts), "/mnt/ts1")})) == whole
