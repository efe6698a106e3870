"""dbops.repo.known: a file's identity recorded once its content is known, and every way a later
write (or an uncertain clock) makes the store read the file again."""

from __future__ import annotations

import os
import random
import sys
from array import array
from pathlib import Path

from dbops.repo import known as kn
from dbops.repo.known import Known


def sealed(tmp_path: Path, *names: str, size: int = 8192) -> Known:
    k = Known()
    for n in names:
        (tmp_path / n).write_bytes(b"x" * size)
        k.record(f"base/1/{n}", str(tmp_path / n))
    k.seal(str(tmp_path))
    return k


def test_a_file_nothing_wrote_since_is_unchanged(tmp_path):
    k = sealed(tmp_path, "1", "2")
    assert k.usable() and len(k) == 2
    assert k.unchanged("base/1/1", str(tmp_path / "1"), 8192)
    assert k.unchanged("base/1/2", str(tmp_path / "2"), 8192)
    assert k.sealed_at is not None and k.sealed_at > k.latest  # the clock moved past every recorded time


def test_a_write_of_the_same_size_is_seen(tmp_path):
    k = sealed(tmp_path, "1")
    fd = os.open(tmp_path / "1", os.O_WRONLY)
    try:
        os.pwrite(fd, b"y", 100)  # what PostgreSQL does to a page: same size, same inode
    finally:
        os.close(fd)
    assert k.usable()
    assert not k.unchanged("base/1/1", str(tmp_path / "1"), 8192)


def test_mtime_set_back_still_shows_in_ctime(tmp_path):
    k = sealed(tmp_path, "1")
    st = os.stat(tmp_path / "1")
    fd = os.open(tmp_path / "1", os.O_WRONLY)
    try:
        os.pwrite(fd, b"y", 100)
    finally:
        os.close(fd)
    os.utime(tmp_path / "1", ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime as recorded: only ctime differs
    now = os.stat(tmp_path / "1")
    assert now.st_mtime_ns == st.st_mtime_ns and now.st_ctime_ns != st.st_ctime_ns
    assert not k.unchanged("base/1/1", str(tmp_path / "1"), 8192)


def test_truncated_replaced_or_unknown_files_are_read(tmp_path):
    k = sealed(tmp_path, "1", "2", "3")
    os.truncate(tmp_path / "1", 8192)  # to the same size: ftruncate still stamps the file
    st = os.stat(tmp_path / "2")
    (tmp_path / "2.new").write_bytes(b"x" * 8192)
    os.utime(tmp_path / "2.new", ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp_path / "2.new", tmp_path / "2")  # same path, size and mtime: another inode
    (tmp_path / "4").write_bytes(b"x" * 8192)  # created after (by replay): never recorded
    assert not k.unchanged("base/1/1", str(tmp_path / "1"), 8192)
    assert not k.unchanged("base/1/2", str(tmp_path / "2"), 8192)
    assert not k.unchanged("base/1/4", str(tmp_path / "4"), 8192)
    assert not k.unchanged("base/1/3", str(tmp_path / "3"), 4096)  # the walk saw another size
    assert not k.unchanged("base/1/3", str(tmp_path / "gone"), 8192)
    assert k.unchanged("base/1/3", str(tmp_path / "3"), 8192)


def test_nothing_is_trusted_before_the_seal_or_after_the_clock_went_back(tmp_path):
    k = Known()
    (tmp_path / "1").write_bytes(b"x")
    k.record("base/1/1", str(tmp_path / "1"))
    assert not k.usable() and not k.unchanged("base/1/1", str(tmp_path / "1"), 1)
    k.seal(str(tmp_path))
    k.record("base/1/2", str(tmp_path / "1"))  # after the seal: ignored
    assert len(k) == 1 and k.usable()
    k.sealed_at += 3600 * 10**9  # the file clock is now an hour before the seal: a clock stepped back
    assert not k.usable() and len(k) == 0
    assert not k.unchanged("base/1/1", str(tmp_path / "1"), 1)


def test_a_seal_waits_for_the_clock_or_keeps_nothing(tmp_path, monkeypatch):
    k = Known()
    (tmp_path / "1").write_bytes(b"x")
    k.record("base/1/1", str(tmp_path / "1"))
    k.latest = kn.clock_now(str(tmp_path)) + 3600 * 10**9  # a time the clock will not reach
    monkeypatch.setattr(kn, "PROBE_LIMIT", 0.05)
    k.seal(str(tmp_path))
    assert k.sealed_at is None and len(k) == 0 and not k.usable()
    assert not list(tmp_path.glob(".dbops-clock-*"))  # the probes are removed


def test_two_paths_with_one_hash_are_both_forgotten(tmp_path, monkeypatch):
    monkeypatch.setattr(kn, "path_hash", lambda path: 7 if path in ("a", "b") else hash(path) & (2**63 - 1))
    k = Known()
    for n in ("a", "b", "c"):
        (tmp_path / n).write_bytes(b"x")
        k.record(n, str(tmp_path / n))
    k.seal(str(tmp_path))
    assert len(k) == 1
    assert not k.unchanged("a", str(tmp_path / "a"), 1) and not k.unchanged("b", str(tmp_path / "b"), 1)
    assert k.unchanged("c", str(tmp_path / "c"), 1)


def test_links_and_non_files(tmp_path):
    (tmp_path / "ts").mkdir()
    (tmp_path / "ts" / "16385").write_bytes(b"x" * 10)
    (tmp_path / "link").symlink_to(tmp_path / "ts")
    k = Known()
    k.record("pg_tblspc/1/16385", str(tmp_path / "link" / "16385"))  # a tablespace file, through its link
    k.record("base", str(tmp_path / "ts"))  # a folder: not recorded
    k.seal(str(tmp_path))
    assert len(k) == 1
    assert k.unchanged("pg_tblspc/1/16385", str(tmp_path / "ts" / "16385"), 10)


def test_the_record_stays_small(tmp_path):
    k = Known()
    for i in range(100_000):
        k.hashes.append(kn.path_hash(str(i)))
        for col, v in zip(k.cols, (2, 3, 4, 5, 6)):
            col.append(v + i)
    k.seal(str(tmp_path))
    assert len(k) == 100_000 and not k.hashes
    size = sum(sys.getsizeof(c) for c in (*k.cols, k.sorted, k.order))
    assert size < 100_000 * 54  # 52 bytes a file (arrays), whatever the files' sizes
    assert list(k.sorted) == sorted(kn.path_hash(str(i)) for i in range(100_000))
    for i in (0, 1, 77_777, 99_999):  # each path finds its own record
        assert k._identity(k._row(str(i))) == (2 + i, 3 + i, 4 + i, 5 + i, 6 + i)


def test_the_seal_sorts_in_runs_as_sorted_does():
    rng = random.Random(11)
    cases = [
        [],  # nothing recorded
        [5],
        [rng.getrandbits(64) for _ in range(7)],  # one run, shorter than it
        [rng.getrandbits(64) for _ in range(8)],  # exactly one run
        [rng.getrandbits(64) for _ in range(9)],  # a run and one more row
        [rng.getrandbits(64) for _ in range(1000)],  # many runs
        [2**64 - 1, 0] * 20 + [2**63] * 5,  # the extremes, and ties across and within runs
        [3] * 50,  # every key the same: the indexes' order
        list(range(100)),  # sorted already
        list(range(100, 0, -1)),  # reversed
        [rng.randrange(4) for _ in range(333)],  # few distinct keys, many ties
    ]
    for keys in cases:
        a = array("Q", keys)
        for run in (1, 2, 8, 1 << 16):
            assert list(kn.sorted_order(a, run)) == sorted(range(len(keys)), key=keys.__getitem__), (keys, run)


def test_two_paths_with_one_hash_among_many_runs_are_both_forgotten(tmp_path, monkeypatch):
    monkeypatch.setattr(kn, "RUN", 4)
    monkeypatch.setattr(kn, "path_hash", lambda path: 7 if path in ("a", "b") else int(path[1:]) * 3)
    k = Known()
    names = ["a", "b"] + [f"f{i}" for i in range(30)]
    random.Random(3).shuffle(names)
    for n in names:
        (tmp_path / n).write_bytes(n.encode())
        k.record(n, str(tmp_path / n))
    k.seal(str(tmp_path))
    assert len(k) == 30 and list(k.sorted) == sorted(i * 3 for i in range(30))
    assert not k.unchanged("a", str(tmp_path / "a"), 1) and not k.unchanged("b", str(tmp_path / "b"), 1)
    assert all(k.unchanged(f"f{i}", str(tmp_path / f"f{i}"), len(f"f{i}")) for i in range(30))
    assert not k.unchanged("f1", str(tmp_path / "f2"), 2)  # another file's identity


def test_the_earlier_entry_is_taken_only_when_it_covers_the_file(tmp_path):
    from dbops.repo import walk
    from dbops.repo.manifest import DIR, FILE, ChunkRef, FileEntry
    from dbops.repo.storeorder import known_refs

    (tmp_path / "16384").write_bytes(b"x" * 16384)
    k = Known()
    k.record("base/1/16384", str(tmp_path / "16384"))
    k.seal(str(tmp_path))
    refs = (ChunkRef("a" * 64, "p", 0, 10, 8192), ChunkRef("b" * 64, "p", 10, 10, 8192))
    e = walk.WalkEntry("base/1/16384", FILE, 0o600, 0, 16384)
    pe = FileEntry("base/1/16384", FILE, 0o600, 0, 16384, None, refs, 8192)
    real = str(tmp_path / "16384")
    assert known_refs(k, e, pe, 8192, real) == list(refs)
    assert known_refs(None, e, pe, 8192, real) is None  # no records: read
    assert known_refs(k, e, None, 8192, real) is None  # not in the earlier backup
    assert known_refs(k, e, FileEntry("base/1/16384", DIR, 0o700, 0), 8192, real) is None
    assert known_refs(k, e, pe, 32768, real) is None  # another block size
    assert known_refs(k, e, FileEntry("base/1/16384", FILE, 0o600, 0, 16384, None, refs[:1], 8192), 8192,
                      real) is None  # refs that do not cover it (a copy recorded short)
    assert known_refs(k, e, FileEntry("base/1/16384", FILE, 0o600, 0, 8192, None, refs[:1], 8192), 8192,
                      real) is None  # the earlier entry's size
    assert known_refs(k, walk.WalkEntry("base/1/16384", FILE, 0o600, 0, 8192), pe, 8192, real) is None


def test_a_hard_link_made_after_the_stop_keeps_the_file_known(tmp_path):
    names = [str(n) for n in range(1, 41)]
    k = sealed(tmp_path, *names)
    for n in reversed(names):  # any order: the records are found by their sorted hashes
        before = os.stat(tmp_path / n)
        os.link(tmp_path / n, tmp_path / f"{n}.shadow")  # changes its ctime and link count only
        if n != "2":  # not told: read again
            k.linked(f"base/1/{n}", before, os.stat(tmp_path / n))
    assert all(k.unchanged(f"base/1/{n}", str(tmp_path / n), 8192) for n in names if n != "2")
    assert not k.unchanged("base/1/2", str(tmp_path / "2"), 8192)
    fd = os.open(tmp_path / "3", os.O_WRONLY)
    try:
        os.pwrite(fd, b"y", 0)
    finally:
        os.close(fd)
    before = os.stat(tmp_path / "3")
    os.link(tmp_path / "3", tmp_path / "3.again")
    k.linked("base/1/3", before, os.stat(tmp_path / "3"))  # written before the link: not the file recorded
    assert not k.unchanged("base/1/3", str(tmp_path / "3"), 8192)
