"""Catalog: a backup exists iff its manifest does; order by consistent time, never by name;
append-only status records; backup ids."""

from __future__ import annotations

import pytest

from dbops.repo import catalog
from dbops.repo import manifest as mf
from dbops.repo.manifest import Manifest, PgState
from dbops.errors import NotFoundError
from dbops.storage.layout import Layout
from dbops.storage.local import LocalStore


def put_backup(store, layout, backup_id, t, lsn=0x5000000, with_metadata=True):
    m = Manifest(backup_id=backup_id, pg=PgState("15", "1", 1, lsn - 0x100, lsn, t), chunk_size=65536,
                 compression={"algorithm": "zstd", "level": 3}, files=[])
    if with_metadata:
        mf.save(store, layout, m)
    else:  # a store that keeps no object metadata: the catalog falls back to reading the manifest
        store.put(layout.manifest(backup_id), m.to_bytes(), if_absent=True)
    return m


@pytest.fixture
def env(tmp_path):
    return LocalStore(tmp_path / "s"), Layout("p")


def test_order_is_by_consistent_time_not_name(env):
    store, layout = env
    put_backup(store, layout, "zzz-oldest", 1000.0)
    put_backup(store, layout, "aaa-newest", 3000.0)
    put_backup(store, layout, "mmm-middle", 2000.0, with_metadata=False)
    assert [b.backup_id for b in catalog.list_backups(store, layout)] == ["zzz-oldest", "mmm-middle", "aaa-newest"]


def test_packs_without_a_manifest_are_no_backup(env):
    store, layout = env
    put_backup(store, layout, "b1", 1000.0)
    # An interrupted run: packs and even status written, manifest never.
    store.put(layout.pack("ab" * 16), b"data")
    store.put(layout.status("b2", "00000000000000000001-x"), b"{}")
    assert [b.backup_id for b in catalog.list_backups(store, layout)] == ["b1"]
    with pytest.raises(NotFoundError):
        mf.load(store, layout, "b2")
    with pytest.raises(NotFoundError):
        catalog.record_status(store, layout, "b2", catalog.STORED, run_id="r")


def test_status_records_append_and_latest_wins(env):
    store, layout = env
    put_backup(store, layout, "b1", 1000.0)
    assert catalog.latest_status(store, layout, "b1") is None
    catalog.record_status(store, layout, "b1", catalog.STORED, run_id="run-1", timings={"store": 4.2}, now=100.0)
    catalog.record_status(store, layout, "b1", catalog.VALIDATED, run_id="run-2", phase="validate",
                          timings={"restore": 3.0, "start": 1.0, "replay": 2.5}, now=200.0)
    recs = catalog.statuses(store, layout, "b1")
    assert [r.state for r in recs] == ["stored", "validated"]
    latest = catalog.latest_status(store, layout, "b1")
    assert latest.state == "validated" and latest.run_id == "run-2" and latest.at == 200.0
    assert latest.timings == {"restore": 3.0, "start": 1.0, "replay": 2.5}
    [b] = catalog.list_backups(store, layout)
    assert b.state == "validated" and b.usable
    # Nothing is rewritten: both objects stay.
    assert len(list(store.list(layout.status_prefix("b1")))) == 2


def test_failed_needs_a_reason_and_makes_a_backup_unusable(env):
    store, layout = env
    put_backup(store, layout, "old", 1000.0)
    put_backup(store, layout, "new", 2000.0)
    catalog.record_status(store, layout, "old", catalog.VALIDATED, run_id="r1")
    with pytest.raises(ValueError):
        catalog.record_status(store, layout, "new", catalog.FAILED, run_id="r2")
    catalog.record_status(store, layout, "new", catalog.FAILED, run_id="r2", phase="validate",
                          reason="PostgreSQL did not start: invalid checkpoint record")
    assert catalog.newest_usable(store, layout).backup_id == "old"
    [_, new] = catalog.list_backups(store, layout)
    assert new.state == "failed" and "invalid checkpoint" in new.status.reason


def test_newest_usable_counts_stored_backups_unless_validated_is_required(env):
    store, layout = env
    put_backup(store, layout, "v", 1000.0)
    put_backup(store, layout, "s", 2000.0)
    catalog.record_status(store, layout, "v", catalog.VALIDATED, run_id="r")
    assert catalog.newest_usable(store, layout).backup_id == "s"  # no status yet counts as stored
    assert catalog.newest_usable(store, layout, require_validated=True).backup_id == "v"
    assert catalog.newest_usable(LocalStore(store.root / "empty"), layout) is None


def test_backup_ids_are_time_sortable_and_unique():
    a = catalog.new_backup_id(1_764_000_000.5)
    b = catalog.new_backup_id(1_764_000_001.25)
    assert catalog.is_backup_id(a) and catalog.is_backup_id(b)
    assert a.startswith("20251124T") and ".500Z-" in a
    assert a < b
    assert len({catalog.new_backup_id(1_764_000_000.0) for _ in range(100)}) == 100


def test_the_catalog_reads_backups_side_by_side_in_their_order():
    import threading
    import time

    from dbops.repo.catalog import READERS, each

    inside, most = [0], [0]
    lock = threading.Lock()

    def read(i: int) -> int:
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.02)
        with lock:
            inside[0] -= 1
        return i * i

    assert each(read, range(20)) == [i * i for i in range(20)]
    assert 1 < most[0] <= READERS

    def fails(i: int) -> int:
        if i in (3, 7):
            raise NotFoundError(f"object {i} is gone")
        return i

    with pytest.raises(NotFoundError, match="object 3"):
        each(fails, range(10))
    assert each(fails, [5]) == [5] and each(fails, []) == []
