"""Retention plans: keep_last / keep_within by time (not name), the newest good backup always
kept, failed ones only on request, packs freed only when no kept manifest needs them, the WAL
boundary; and execution against LocalStore (manifests first, then packs)."""

from __future__ import annotations

import os
import time

import pytest

from dbops.repo import catalog
from dbops.repo import retention
from dbops.repo import manifest as mf
from dbops.repo.catalog import FAILED, BackupInfo, StatusRecord
from dbops.repo.manifest import ChunkRef, FileEntry, Manifest, PgState
from dbops.config import RetentionSettings
from dbops.errors import ConflictError
from dbops.storage.base import ObjectInfo
from dbops.storage.layout import Layout
from dbops.storage.local import LocalStore

DAY = 86400.0
NOW = 1_800_000_000.0
L = Layout("p")


def info(backup_id, age_days, redo, tli=1, failed=False):
    st = StatusRecord(backup_id, FAILED, NOW, "r", reason="did not start") if failed else None
    return BackupInfo(backup_id, NOW - age_days * DAY, redo + 0x100, redo, tli, None, 100, 10, st)


def objs(*pack_ids, age=DAY * 30):
    return [ObjectInfo(L.pack(p), 1000, last_modified=NOW - age) for p in pack_ids] + \
           [ObjectInfo(L.pack_index(p), 10, last_modified=NOW - age) for p in pack_ids]


# Names sort opposite to time on purpose: "a" is the newest.
BACKUPS = [info("d", 10, 0x1000000), info("c", 5, 0x3000000), info("b", 2, 0x5000000), info("a", 0.5, 0x7000000)]
PACKS = {"d": {"p1", "p2"}, "c": {"p2", "p3"}, "b": {"p3", "p4"}, "a": {"p4", "p5"}}


def plan(policy, backups=BACKUPS, packs=PACKS, pack_objects=None, **kw):
    pack_objects = objs("p1", "p2", "p3", "p4", "p5") if pack_objects is None else pack_objects
    return retention.plan(backups, lambda i: packs.get(i, set()), pack_objects, L, policy, now=NOW, **kw)


def test_keep_last_by_time_frees_only_unreferenced_packs():
    p = plan(RetentionSettings(keep_last=2))
    assert p.keep == ("b", "a") and p.remove == ("d", "c")
    assert p.remove_packs == ("p1", "p2")  # p3 is still needed by b
    assert p.freed_bytes == 2 * 1010
    assert p.oldest_wal == "000000010000000000000005"  # b's redo LSN 0/5000000
    assert p.oldest_wal_lsn == 0x5000000


def test_keep_within_keeps_the_window_and_the_backup_before_it():
    p = plan(RetentionSettings(keep_within=int(3 * DAY)))
    assert p.keep == ("c", "b", "a")  # c (5 days old) restores the window's start
    assert p.remove == ("d",) and p.remove_packs == ("p1",)
    assert p.oldest_wal == "000000010000000000000003"


def test_both_rules_keep_the_union_and_no_policy_keeps_everything():
    assert plan(RetentionSettings(keep_last=1, keep_within=int(3 * DAY))).keep == ("c", "b", "a")
    p = plan(RetentionSettings())
    assert p.keep == ("d", "c", "b", "a") and p.empty


def test_newest_good_backup_is_kept_even_when_failed_ones_are_newer():
    backups = [info("old", 30, 0x1000000), info("bad1", 1, 0x2000000, failed=True),
               info("bad2", 0.1, 0x3000000, failed=True)]
    p = plan(RetentionSettings(keep_within=int(DAY)), backups=backups, packs={"old": {"p1"}, "bad2": {"p2"}},
             pack_objects=objs("p1", "p2"))
    assert p.keep == ("old",)
    assert p.remove == ("bad1", "bad2")
    assert "failed" in p.reasons["bad2"]
    assert p.remove_packs == ("p2",)
    assert p.oldest_wal == "000000010000000000000001"


def test_failed_backups_are_kept_when_asked_but_never_count_for_wal():
    backups = [info("bad", 20, 0x1000000, failed=True), info("good", 1, 0x9000000)]
    p = plan(RetentionSettings(keep_last=1), backups=backups, packs={"bad": {"p1"}, "good": {"p2"}},
             keep_failed=True)
    assert p.keep == ("bad", "good") and p.remove == ()
    assert p.oldest_wal == "000000010000000000000009"


def test_orphan_packs_are_removed_only_after_the_grace_period():
    pack_objects = objs("p1", "p2", "p3", "p4", "p5") + objs("young", age=60) + objs("old", age=3 * DAY)
    p = plan(RetentionSettings(keep_last=4), pack_objects=pack_objects)
    assert p.remove == () and p.remove_packs == ("old",)


def test_wal_boundary_uses_the_timeline_of_the_oldest_kept_backup():
    backups = [info("t1", 3, 0x2000000, tli=1), info("t2", 1, 0x4000000, tli=2)]
    p = plan(RetentionSettings(keep_last=5), backups=backups, packs={})
    assert p.oldest_wal == "000000010000000000000002" and p.oldest_wal_timeline == 1
    p = plan(RetentionSettings(keep_last=1), backups=backups, packs={})
    assert p.oldest_wal == "000000020000000000000004"


def test_nothing_usable_keeps_no_wal():
    p = plan(RetentionSettings(keep_last=1), backups=[info("bad", 1, 0x1000000, failed=True)], packs={})
    assert p.keep == () and p.oldest_wal is None


# ---------------------------------------------------------------------- against a store


def store_backup(store, backup_id, t, packs):
    files = [FileEntry(f"f{i}", "file", 0o600, 0, 10, None, (ChunkRef("0" * 64, p, 0, 10, 10),))
             for i, p in enumerate(packs)]
    m = Manifest(backup_id=backup_id, pg=PgState("15", "1", 1, 0x1000000, 0x1000100, t), chunk_size=65536,
                 compression={}, files=files)
    for p in packs:
        if store.head(L.pack(p)) is None:
            store.put(L.pack(p), b"x" * 10)
            store.put(L.pack_index(p), b"i")
    mf.save(store, L, m)
    catalog.record_status(store, L, backup_id, catalog.STORED, run_id="r")


def test_execute_deletes_manifests_then_the_rest_then_packs(tmp_path):
    store = LocalStore(tmp_path)
    now = time.time()
    store_backup(store, "zz-old", now - 10 * DAY, ["p1", "p2"])
    store_backup(store, "aa-new", now - DAY, ["p2", "p3"])
    p = retention.build_plan(store, L, RetentionSettings(keep_last=1), now=now)
    assert p.remove == ("zz-old",) and p.remove_packs == ("p1",)

    batches: list[list[str]] = []
    real_delete_many = store.delete_many
    store.delete_many = lambda keys: (batches.append(list(keys)), real_delete_many(batches[-1]))[1]
    before = store.requests()
    res = retention.execute(store, L, p)
    deleted = [k for b in batches for k in b]
    assert batches[0] == [L.manifest("zz-old")]  # the backup ceases to exist first
    assert deleted.index(L.pack("p1")) > max(i for i, k in enumerate(deleted) if "/backups/" in k)
    # One request per batch, not one per object.
    after = store.requests()
    assert after.get("DeleteObjects", 0) - before.get("DeleteObjects", 0) == len([b for b in batches if b]) == 3
    assert after.get("DeleteObject", 0) == before.get("DeleteObject", 0)
    assert res.removed_backups == ["zz-old"] and res.removed_packs == ["p1"]
    assert [b.backup_id for b in catalog.list_backups(store, L)] == ["aa-new"]
    assert list(store.list(L.backup_prefix("zz-old"))) == []
    assert store.head(L.pack("p1")) is None and store.head(L.pack("p2")) and store.head(L.pack("p3"))


def test_execute_refuses_when_a_backup_appeared_after_planning(tmp_path):
    store = LocalStore(tmp_path)
    now = time.time()
    store_backup(store, "b1", now - 10 * DAY, ["p1"])
    store_backup(store, "b2", now - DAY, ["p2"])
    p = retention.build_plan(store, L, RetentionSettings(keep_last=1), now=now)
    store_backup(store, "b3", now, ["p1"])  # deduped against b1's pack after the plan was made
    with pytest.raises(ConflictError):
        retention.execute(store, L, p)
    assert store.head(L.pack("p1")) is not None
    assert os.path.exists(store.path_of(L.manifest("b1")))


def test_delete_many_sends_batches_of_1000(tmp_path):
    store = LocalStore(tmp_path)
    keys = [f"x/{i:05d}" for i in range(2345)]
    for k in keys[:3]:
        store.put(k, b"x")
    store.delete_many(iter(keys))  # a generator, and most keys never existed: not an error
    assert store.requests()["DeleteObjects"] == 3
    assert list(store.list("x/")) == []


def test_the_newest_validated_backup_is_never_removed():
    """Issue #13 item 6: stored-but-unvalidated newer backups never push the last proven one out."""
    from dbops.repo.catalog import STORED, VALIDATED

    def with_state(b, state):
        return BackupInfo(*[getattr(b, f) for f in ("backup_id", "consistent_time", "consistent_lsn", "redo_lsn",
                                                    "timeline", "parent_id", "logical_size", "stored_bytes")],
                          StatusRecord(b.backup_id, state, NOW, "r"))
    backups = [with_state(BACKUPS[0], VALIDATED), with_state(BACKUPS[1], VALIDATED),
               with_state(BACKUPS[2], STORED), with_state(BACKUPS[3], STORED)]
    p = plan(RetentionSettings(keep_last=1), backups=backups)
    assert p.keep == ("c", "a") and p.remove == ("d", "b")
    assert p.reasons["c"] == "newest validated backup"



def test_a_prune_killed_after_the_manifests_leaves_nothing_the_next_prune_keeps(tmp_path):
    """kill -9 between deleting the manifests and the rest (issue 13): the next prune removes the rest;
    a backup killed before its manifest (only its relation map stored) goes once older than orphan_grace."""
    store = LocalStore(tmp_path)
    now = time.time()
    store_backup(store, "zz-old", now - 10 * DAY, ["p1", "p2"])
    store_backup(store, "aa-new", now - DAY, ["p2", "p3"])
    store.delete_many([L.manifest("zz-old")])  # the killed prune got this far
    store.put(L.relation_map("unfinished"), b"relmap")  # a backup killed before its manifest
    p = retention.build_plan(store, L, RetentionSettings(keep_last=1), now=now)
    assert p.remove == () and set(p.leftovers) == {o.key for o in store.list(L.backup_prefix("zz-old"))}
    assert p.leftovers and not [k for k in p.leftovers if "unfinished" in k]
    retention.execute(store, L, p)
    assert list(store.list(L.backup_prefix("zz-old"))) == []
    assert store.head(L.relation_map("unfinished")) is not None  # may be a run still writing: grace
    later = retention.build_plan(store, L, RetentionSettings(keep_last=1), now=now + 2 * DAY)
    assert later.leftovers == (L.relation_map("unfinished"),)
    assert later.remove_packs == ("p1",)  # no manifest names it any more: an orphan past its grace


def _gap_record(backup_id, gap: dict) -> StatusRecord:
    return StatusRecord(backup_id, catalog.VALIDATED, NOW, "r", detail={"wal_gap": gap})


GAP = {"missing": "000000010000000000000004", "complete_until": "000000010000000000000003",
       "lsn": "0/3FFFF00", "time": NOW - 4 * DAY, "commit_lsn": "0/3FFF000"}


def test_the_newest_backup_before_a_wal_gap_is_kept():
    c = info("c", 5, 0x3000000)
    c = BackupInfo(**{**c.__dict__, "status": _gap_record("c", GAP)})
    b = info("b", 2, 0x5000000)
    b = BackupInfo(**{**b.__dict__, "status": StatusRecord("b", catalog.VALIDATED, NOW, "r")})
    backups = [info("d", 10, 0x1000000), c, b, info("a", 0.5, 0x7000000)]
    p = plan(RetentionSettings(keep_last=1), backups=backups)
    assert p.keep == ("c", "b", "a") and p.remove == ("d",)  # b: the newest validated
    assert "WAL gap at 000000010000000000000004" in p.reasons["c"]
    assert p.oldest_wal == "000000010000000000000003"  # c's WAL stays
    # With keep_within, only while the times it alone reaches are inside the window.
    assert "c" not in plan(RetentionSettings(keep_within=int(1 * DAY)), backups=backups).keep


@pytest.mark.parametrize("bad", [
    "not a dict", {"missing": "../../x", "complete_until": "000000010000000000000003", "lsn": "0/1"},
    {**GAP, "lsn": "nonsense"}, {**GAP, "time": "soon"}, {k: v for k, v in GAP.items() if k != "missing"},
])
def test_a_malformed_gap_record_from_the_bucket_counts_as_none(bad):
    assert catalog.wal_gap_of(_gap_record("c", bad)) is None
    good = catalog.wal_gap_of(_gap_record("c", GAP))
    assert good is not None and good.lsn == 0x3FFFF00 and good.missing == GAP["missing"]
    failed = StatusRecord("c", FAILED, NOW, "r", reason="x", detail={"wal_gap": GAP})
    assert catalog.wal_gap_of(failed) is None
