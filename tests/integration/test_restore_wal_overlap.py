"""A restore's server starts once the backup is downloaded, before the WAL to replay is all fetched;
replay then waits for each segment, which is released to it only after it was read for CREATE
TABLESPACE. Against a real lab (PostgreSQL 15, SeaweedFS): the segment holding a CREATE TABLESPACE
is held back in storage until the restored server runs; the restore refuses a live location (exit
11, nothing left), and, the location freed, restores the tablespace there row for row."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from dbops import proc
from dbops.errors import DbopsError, ExitCode
from dbops.lab.harness import free_port
from dbops.ops.restore.plan import Options
from dbops.ops.restore.run import restore as run_restore
from dbops.ops.restore.target import from_options
from dbops.storage import open_store
from dbops.storage.layout import Layout

from labkit import backup, own_lab, restored, sql, stop, switch_and_archive

pytestmark = [pytest.mark.integration, pytest.mark.container]

HOLD_SECONDS = 90  # the longest a held segment waits for the restored server (the old order never started it)


class HoldsSegment:
    """The lab's store, but the WAL fetched ahead for a restore (its threads) gets `key` only once
    the restored server runs on `target` (its postmaster.pid), or after HOLD_SECONDS."""

    def __init__(self, inner, key: str, target: Path):
        self.inner, self.key, self.target = inner, key, target
        self.server_ran: bool | None = None  # whether it ran when the segment was handed over

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def get_to_file(self, key, path, *args, **kwargs):
        if key == self.key and threading.current_thread().name.startswith("dbops-walahead"):
            deadline = time.monotonic() + HOLD_SECONDS
            while not (self.target / "postmaster.pid").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            self.server_ran = (self.target / "postmaster.pid").exists()
        return self.inner.get_to_file(key, path, *args, **kwargs)


@pytest.fixture(scope="module")
def lab(lab_factory):
    yield from own_lab(lab_factory, "waloverlap")


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for root, dirs, files in os.walk(folder):
        for n in [".", *dirs, *files]:
            st = (Path(root) / n).lstat()
            out[os.path.relpath(Path(root) / n, folder)] = (st.st_mtime_ns, st.st_ctime_ns)
    return out


def test_replay_overlaps_the_wal_fetch_and_a_later_create_tablespace_is_read_before_replay_meets_it(lab):
    p = lab.primary
    os.environ["DBOPS_LOCK_DIR"] = str(lab.dir / "run")
    try:
        sql(p, "CREATE TABLE base_t (id int PRIMARY KEY, note text)")
        sql(p, "INSERT INTO base_t SELECT g, 'base ' || g FROM generate_series(1, 200) g")
        backup(lab)
        for i in range(2):  # the CREATE lands a few segments after the backup
            sql(p, f"INSERT INTO base_t SELECT g, 'more' FROM generate_series({1001 + 100 * i}, {1100 + 100 * i}) g")
            switch_and_archive(lab)
        loc = lab.dir / "late" / "loc"
        loc.mkdir(parents=True, mode=0o700)
        proc.run(["chown", "postgres:postgres", str(loc)])
        os.chmod(loc.parent, 0o755)
        sql(p, f"CREATE TABLESPACE late LOCATION '{loc}'")
        held = sql(p, "SELECT pg_walfile_name(pg_current_wal_insert_lsn())")[0][0]  # the record ends here
        sql(p, "CREATE TABLE late_t (id int PRIMARY KEY, note text) TABLESPACE late")
        sql(p, "INSERT INTO late_t SELECT g, 'late ' || g FROM generate_series(1, 500) g")
        expected = {t: sql(p, f"SELECT * FROM {t} ORDER BY 1") for t in ("base_t", "late_t")}
        lsn = sql(p, "SELECT pg_current_wal_insert_lsn()::text")[0][0]
        sql(p, "INSERT INTO late_t VALUES (9999, 'after the target')")
        switch_and_archive(lab)
        for i in range(2):  # commits in later segments: the restore's plan reads the archive's end, not `held`
            sql(p, f"INSERT INTO base_t VALUES ({5000 + i}, 'after the target')")
            switch_and_archive(lab)
        key = Layout(lab.config.storage.prefix).wal_key(held)
        seg_size = int(sql(p, "SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'")[0][0])

        def restore_to(target: Path, port: int | None = None) -> tuple[HoldsSegment, object]:
            store = HoldsSegment(open_store(lab.config.storage), key, target)
            opts = Options(target=from_options(to_lsn=lsn), target_dir=target, start=port is not None, port=port)
            # two segments fetched ahead of replay at most (backup.restore_wal_ahead)
            cfg = replace(lab.config, backup=replace(lab.config.backup, restore_wal_ahead=2 * seg_size))
            return store, run_restore(cfg, opts, store=store)

        # 1. The location is the live primary's tablespace: refused when its segment is read, while
        #    the restored server already runs, waiting for that segment; nothing is left behind.
        sql(p, "CHECKPOINT")  # the primary's own writes there done
        before = tree(loc)
        target = lab.dir / "refused"
        store = HoldsSegment(open_store(lab.config.storage), key, target)
        with pytest.raises(DbopsError) as err:
            run_restore(lab.config, Options(target=from_options(to_lsn=lsn), target_dir=target), store=store)
        assert err.value.exit_code == ExitCode.PRECONDITION, err.value
        assert "created after the backup" in err.value.message and str(loc) in err.value.message, err.value
        assert "--tablespace-map" in (err.value.hint or ""), err.value.hint
        assert store.server_ran is True, "the server did not start before the WAL was all fetched"
        assert not target.exists()
        sql(p, "CHECKPOINT")
        assert tree(loc) == before, "the live tablespace folder was touched"

        # 2. The location freed on the primary: the same restore makes the tablespace there.
        sql(p, "DROP TABLE late_t")
        sql(p, "DROP TABLESPACE late")
        assert os.listdir(loc) == []
        target, port = lab.dir / "restored", free_port()
        store, res = restore_to(target, port)
        try:
            assert store.server_ran is True, "the server did not start before the WAL was all fetched"
            assert res.final_state == "promoted", res.reached
            node = restored(lab, port)
            assert {t: sql(node, f"SELECT * FROM {t} ORDER BY 1") for t in ("base_t", "late_t")} == expected
            where = sql(node, "SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'late'")
            assert where == [(str(loc),)]
            assert [n for n in os.listdir(loc) if n.startswith("PG_15_")], os.listdir(loc)
            assert res.wal["fetched_ahead"] >= 6 and not res.wal["failed"], res.wal  # more than the window
        finally:
            stop(target)
    finally:
        os.environ.pop("DBOPS_LOCK_DIR", None)
