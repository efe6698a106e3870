"""The restore's free-space check, before anything is downloaded: each filesystem it writes must
hold its share of the backup's files (a tablespace on another filesystem is counted there, two on
one filesystem are added up), or the restore is refused with exit 11 naming each short one."""

from __future__ import annotations

import os

import pytest

from dbops.errors import ExitCode, PreconditionError
from dbops.ops.restore.room import WAL_MARGIN, check_room, needs, shortages, summed, wal_to_fetch
from dbops.repo.model import FileEntry
from diskfill import needs_root, tmpfs

MiB = 2**20


def f(path: str, size: int) -> FileEntry:
    return FileEntry(path, "file", 0o600, 0, size)


ENTRIES = [FileEntry(".", "dir", 0o700, 0), f("PG_VERSION", 3), f("base/5/16384", 3 * MiB), f("base/5/16385", 0),
           FileEntry("pg_tblspc/16400", "symlink", 0o777, 0, target="/old/ts"),
           f("pg_tblspc/16400/PG_15_202209061/5/16401", 2 * MiB),
           f("pg_tblspc/16500/PG_15_202209061/5/16501", 1 * MiB)]


@needs_root
def test_files_are_counted_on_the_filesystem_they_go_to(tmp_path):
    target = tmp_path / "restored"  # not made yet: its parent's filesystem counts
    with tmpfs(tmp_path / "fast", 4 * MiB) as fast:
        by_dev = needs(ENTRIES, target, {16400: fast / "ts1", 16500: fast / "ts2"})
        main, other = by_dev[tmp_path.stat().st_dev], by_dev[fast.stat().st_dev]
        block = os.statvfs(tmp_path).f_frsize
        assert main.bytes == WAL_MARGIN + 3 * MiB + block  # PG_VERSION takes a whole block, the empty file none
        assert other.bytes == 3 * MiB and other.free == 4 * MiB  # both tablespaces, added up
        assert other.folders == [f"{fast / 'ts1'} (tablespace OID 16400)", f"{fast / 'ts2'} (tablespace OID 16500)"]
        check_room(ENTRIES, target, {16400: fast / "ts1", 16500: fast / "ts2"})  # 3 MiB fit in 4

        with pytest.raises(PreconditionError) as ei:  # the same two, 3 MiB, on 2 MiB
            with tmpfs(tmp_path / "small", 2 * MiB) as small:
                check_room(ENTRIES, target, {16400: small / "ts1", 16500: small / "ts2"})
        e = ei.value
        assert e.exit_code == ExitCode.PRECONDITION
        assert e.message == (f"not enough free space for the restore: {tmp_path / 'small' / 'ts1'} (tablespace OID "
                             f"16400) and {tmp_path / 'small' / 'ts2'} (tablespace OID 16500): needs 3.0 MiB, "
                             "2.0 MiB free"), e.message
        assert "nothing was downloaded or written" in e.detail and "--no-space-check" in e.hint

        with pytest.raises(PreconditionError) as ei:  # the data folder itself on a small filesystem
            check_room(ENTRIES, fast / "data", {16400: tmp_path / "ts1", 16500: tmp_path / "ts2"})
        assert f"{fast / 'data'}: needs " in ei.value.message and "tablespace" not in ei.value.message


@needs_root
def test_a_plan_sums_from_the_manifest_header(tmp_path):
    """The dry run has no entries read: the backup's size and each tablespace's, from its header."""
    entries = summed(10 * MiB, [(16400, 3 * MiB)])
    assert [(e.path, e.size) for e in entries] == [("all", 7 * MiB), ("pg_tblspc/16400/all", 3 * MiB)]
    with tmpfs(tmp_path / "fast", 2 * MiB) as fast:
        assert shortages(entries, tmp_path / "restored", {16400: fast / "ts"}) == \
            f"{fast / 'ts'} (tablespace OID 16400): needs 3.0 MiB, 2.0 MiB free"
        assert shortages(summed(1 * MiB, [(16400, 1 * MiB)]), tmp_path / "restored", {16400: fast / "ts"}) is None


@needs_root
def test_the_wal_to_replay_is_counted_in_the_scratch_folder(tmp_path):
    """The WAL to replay is fetched into the scratch folder before the server starts: a week of WAL
    after the backup must fit there too, on its own filesystem or added to the target's."""
    files = [f("base/5/16384", 1 * MiB)]
    with tmpfs(tmp_path / "scratch", 40 * MiB) as scratch:
        cache = scratch / "restore-1" / "wal"  # not made yet: the scratch folder's filesystem counts
        by_dev = needs(files, tmp_path / "restored", {}, wal=(cache, 48 * MiB))
        assert by_dev[scratch.stat().st_dev].bytes == 48 * MiB
        assert by_dev[scratch.stat().st_dev].folders == [f"{cache} (scratch: the WAL to replay)"]
        assert shortages(files, tmp_path / "restored", {}, wal=(cache, 32 * MiB)) is None
        with pytest.raises(PreconditionError) as ei:
            check_room(files, tmp_path / "restored", {}, wal=(cache, 48 * MiB))
        assert ei.value.message == (f"not enough free space for the restore: {cache} (scratch: the WAL to "
                                    "replay): needs 48.0 MiB, 40.0 MiB free"), ei.value.message
        assert "plus 48.0 MiB of WAL to replay in the scratch folder" in ei.value.detail
        assert "backup.scratch_dir" in ei.value.hint
        # the same scratch holding the target too: both added up
        with pytest.raises(PreconditionError) as ei:
            check_room(files, scratch / "restored", {}, wal=(cache, 16 * MiB))
        assert f"{scratch / 'restored'} and {cache} (scratch: the WAL to replay): needs " in ei.value.message


def test_segments_already_fetched_take_no_more_room(tmp_path):
    seg = 16 * MiB
    (tmp_path / "000000010000000000000003").write_bytes(b"")
    names = [f"0000000100000000000000{n:02X}" for n in range(2, 6)]
    assert wal_to_fetch(tmp_path, names, seg) == 3 * seg
    assert wal_to_fetch(tmp_path / "absent", names, seg) == 4 * seg
