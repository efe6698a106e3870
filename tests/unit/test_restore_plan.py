"""Restore planning without servers: targets, backup fit, the WAL run from a backup, folder settings."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from dbops.errors import UsageError
from dbops.ops.restore import conf as rconf
from dbops.ops.restore import wal as rwal
from dbops.pg import walchain
from dbops.ops.restore.choose import BackupChoice, fits
from dbops.ops.restore.target import LATEST, LSN, TIME, XID, from_options, parse_time, parse_timeline
from dbops.pg.lsn import parse_lsn
from dbops.pg.waldump import Record, parse_record
from dbops.storage.base import ObjectInfo

SEG = 16 * 1024 * 1024


# --------------------------------------------------------------------------- targets


@pytest.mark.parametrize("text", ["2026-11-25T15:46:00+01:00", "2026-11-25T14:46:00Z", "2026-11-25 14:46:00+00:00",
                                  "2026-11-25T09:16:00-05:30"])
def test_timestamps_with_a_zone_are_one_instant(text):
    assert parse_time(text).timestamp() == datetime(2026, 11, 25, 14, 46, tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize("text", ["2026-11-25T15:46:00", "2026-11-25 15:46"])
def test_timestamp_without_zone_is_refused_with_how_to_write_it(text):
    with pytest.raises(UsageError) as e:
        parse_time(text)
    assert "no time zone" in e.value.message and "+01:00" in e.value.hint and "Z" in e.value.hint


def test_target_options():
    t = from_options(to="2026-11-25T15:46:00.5+01:00", exclusive=True)
    assert t.kind == TIME and not t.inclusive and t.value == "2026-11-25 14:46:00.500000+00:00"
    assert t.settings() == {"recovery_target_inclusive": "off", "recovery_target_time": t.value}
    assert from_options(to="latest").kind == LATEST
    lsn = from_options(to_lsn="16/b374d848")
    assert lsn.kind == LSN and lsn.lsn == parse_lsn("16/B374D848") and lsn.value == "16/B374D848"
    assert from_options(to_xid="1234").kind == XID
    with pytest.raises(UsageError):
        from_options()
    with pytest.raises(UsageError):
        from_options(to="latest", to_xid="5")
    with pytest.raises(UsageError):
        from_options(to_lsn="nonsense")
    with pytest.raises(UsageError):
        from_options(to="latest", exclusive=True)
    assert parse_timeline("auto") is None and parse_timeline("latest") == 0 and parse_timeline("3") == 3
    with pytest.raises(UsageError):
        parse_timeline("zero")


# --------------------------------------------------------------------------- which backup fits


def choice(last_commit: float | None, consistent_time: float = 100.0, consistent_lsn: str = "0/5000000"):
    return BackupChoice("b", "validated", 1, parse_lsn("0/4000028"), parse_lsn(consistent_lsn), consistent_time,
                        last_commit, 1, "15")


def test_a_backup_fits_a_time_when_it_holds_no_commit_after_it():
    t = from_options(to="1970-01-01T00:01:30Z")  # epoch 90
    assert fits(choice(last_commit=80.0, consistent_time=120.0), t)  # taken later, but nothing committed since 80
    assert not fits(choice(last_commit=95.0), t)
    assert fits(choice(last_commit=90.0), t) and not fits(choice(last_commit=90.0), from_options(
        to="1970-01-01T00:01:30Z", exclusive=True))
    assert not fits(choice(last_commit=None, consistent_time=120.0), t)  # unknown: bounded by consistent time
    assert fits(choice(None, consistent_lsn="0/5000000"), from_options(to_lsn="0/5000000"))
    assert not fits(choice(None, consistent_lsn="0/5000001"), from_options(to_lsn="0/5000000"))


# --------------------------------------------------------------------------- the WAL run


def inv(names: list[str], histories: set[int] = frozenset()) -> rwal.Inventory:
    i = rwal.Inventory(SEG, {n: ObjectInfo(n, 100) for n in names}, set(histories))
    return i


def test_wal_run_ends_at_the_newest_segment_and_names_holes():
    spans = walchain.chain(1, [])
    names = [f"0000000100000000000000{n:02X}" for n in (3, 4, 5, 7, 8)]
    wr = rwal.wal_range(inv(names), spans, names[0])
    assert wr.end == names[2] and wr.holes == ["000000010000000000000006"]
    assert wr.needed[-1] == names[-1]
    wr = rwal.wal_range(inv(names[:3]), spans, names[0])
    assert wr.end == names[2] and wr.holes == []


def test_wal_run_follows_the_timeline_switch():
    spans = walchain.chain(2, [(1, parse_lsn("0/6000100"), "promoted")])
    names = ["000000010000000000000004", "000000010000000000000005", "000000020000000000000006",
             "000000020000000000000007"]
    wr = rwal.wal_range(inv(names, {2}), spans, names[0])
    assert wr.needed == names and wr.end == names[-1] and not wr.holes
    assert rwal.on_chain(spans, 1, parse_lsn("0/5000000")) and not rwal.on_chain(spans, 1, parse_lsn("0/7000000"))
    assert rwal.timeline_at(spans, parse_lsn("0/6000000")) == 1 and rwal.timeline_at(spans, parse_lsn("0/7000000")) == 2
    # promoted a moment ago: the new timeline has no segment yet; the run ends on the old one
    wr = rwal.wal_range(inv(names[:2], {2}), spans, names[0])
    assert wr.end == names[1] and wr.needed[-1] == "000000020000000000000006" and not wr.holes


def test_last_commit_is_read_from_pg_waldump_lines():
    lines = [Record("Heap", 61, 0, parse_lsn("0/6002608"), "INSERT+INIT", "off 1 flags 0x00"),
             Record("Transaction", 34, 726, parse_lsn("0/6002648"), "COMMIT", "2026-11-25 20:13:47.138891 UTC"),
             Record("XLOG", 24, 0, parse_lsn("0/6002670"), "SWITCH", "")]
    c = rwal.last_xact_end(lines, "000000010000000000000006")
    assert c.lsn == parse_lsn("0/6002648")
    assert c.time == datetime(2026, 11, 25, 20, 13, 47, 138891, tzinfo=timezone.utc).timestamp()
    prepared = [Record("Transaction", 40, 0, 1, "COMMIT_PREPARED", "731: 2026-11-25 20:13:47 UTC; inval msgs: 1")]
    assert rwal.last_xact_end(prepared, "x").time == datetime(2026, 11, 25, 20, 13, 47, tzinfo=timezone.utc).timestamp()
    m = parse_record("rmgr: Transaction len (rec/tot):     34/    34, tx:        726, lsn: 0/06002648, "
                     "prev 0/06002608, desc: COMMIT 2026-11-25 20:13:47.138891 UTC")
    assert m and m.rmgr == "Transaction" and m.kind == "COMMIT"


# --------------------------------------------------------------------------- the folder's settings


def test_auto_conf_block_replaces_earlier_settings(tmp_path):
    (tmp_path / "postgresql.auto.conf").write_text(
        "# Do not edit this file manually!\nport = 5433\nprimary_conninfo = 'host=old'\nwork_mem = '64MB'\n")
    rconf.write_settings(tmp_path, {"restore_command": "dbops wal-fetch %f \"%p\"", "port": "6000",
                                    "recovery_target_name": "it's"}, ["first"])
    rconf.write_settings(tmp_path, {"restore_command": "x", "archive_mode": "off"}, ["second"])
    text = (tmp_path / "postgresql.auto.conf").read_text()
    assert "work_mem = '64MB'" in text and "port" not in text and "primary_conninfo" not in text
    assert text.count(rconf.BLOCK_BEGIN) == 1 and "# second" in text and "# first" not in text
    assert "restore_command = 'x'" in text and "archive_mode = 'off'" in text
    assert rconf.quote("it's") == "'it''s'"


# --------------------------------------------------------------------------- which backup is picked


class _FakeBackups:
    """Stands in for the catalog: BackupInfo rows, and choices built from them."""

    from dbops.ops.restore.choose import Backups

    readable = Backups.readable  # the real method: a damaged manifest is passed over

    def __init__(self, rows: list[tuple[str, str, float]], damaged: tuple[str, ...] = ()):
        from dbops.repo import catalog

        self.infos, self._c, self.damaged, self._bad = [], {}, {}, damaged  # rows: (id, state, last commit)
        for i, (bid, state, t) in enumerate(rows):
            status = catalog.StatusRecord(bid, state, t, "run") if state != catalog.STORED else None
            lsn = parse_lsn(f"0/{i + 5:X}000000")
            self.infos.append(catalog.BackupInfo(bid, t, lsn, lsn - 0x100000, 1, None, 10, 10, status))
            self._c[bid] = BackupChoice(bid, state, 1, lsn - 0x100000, lsn, t, t, 10, "15")

    def choice(self, b):
        from dbops.errors import ValidationError

        if b.backup_id in self._bad:
            raise ValidationError(f"manifest of backup {b.backup_id} (k/{b.backup_id}) is unreadable: ZstdError")
        return self._c[b.backup_id]


def _pick(rows, at, backup_id=None, damaged=()):
    from dbops.ops.restore.choose import pick

    target = from_options(to=f"1970-01-01T00:00:{at:02d}Z")
    return pick(_FakeBackups(rows, damaged), walchain.chain(1, []), target, backup_id)


def test_pick_takes_the_newest_fitting_backup_and_an_older_validated_one_as_fallback():
    p = _pick([("b1", "validated", 10), ("b2", "validated", 20), ("b3", "stored", 30)], 40)
    assert (p.chosen.backup_id, p.fallback.backup_id, p.oldest.backup_id) == ("b3", "b2", "b1")
    assert "b3" in p.notes[0] and "not yet validated" in p.notes[0]
    assert p.notes[1].startswith("fallback: validated backup b2")
    # the stored backups between are skipped: only a validated backup is a fallback
    p = _pick([("b1", "validated", 10), ("b2", "stored", 20), ("b3", "stored", 30)], 40)
    assert (p.chosen.backup_id, p.fallback.backup_id) == ("b3", "b1")
    # the newest that fits the target, not the newest there is
    p = _pick([("b1", "validated", 10), ("b2", "stored", 20), ("b3", "stored", 30)], 25)
    assert (p.chosen.backup_id, p.fallback.backup_id) == ("b2", "b1")


def test_pick_of_a_validated_backup_has_no_fallback():
    p = _pick([("b1", "validated", 10), ("b2", "validated", 20)], 40)
    assert p.chosen.backup_id == "b2" and p.fallback is None and p.notes == []
    p = _pick([("b1", "validated", 10), ("b2", "failed", 20), ("b3", "stored", 30)], 25)
    assert p.chosen.backup_id == "b1" and p.fallback is None  # b2 failed, b3 holds commits after the target


def test_pick_without_a_validated_backup_that_fits_says_there_is_no_fallback():
    p = _pick([("b1", "stored", 10), ("b2", "stored", 20)], 40)
    assert p.chosen.backup_id == "b2" and p.fallback is None and "no fallback" in p.notes[-1]
    p = _pick([("b1", "failed", 10), ("b2", "stored", 20)], 40)
    assert p.chosen.backup_id == "b2" and p.fallback is None  # a failed backup is never the fallback


def test_pick_with_backup_id_takes_exactly_that_one_without_fallback():
    p = _pick([("b1", "validated", 10), ("b2", "stored", 20)], 40, backup_id="b2")
    assert p.chosen.backup_id == "b2" and p.fallback is None and p.notes == ["backup b2 chosen with --backup"]
    p = _pick([("b1", "validated", 10), ("b2", "stored", 20)], 40, backup_id="b1")
    assert p.chosen.backup_id == "b1" and p.fallback is None


def test_pick_refuses_a_target_before_the_oldest_backup():
    from dbops.errors import TargetError

    with pytest.raises(TargetError) as e:
        _pick([("b1", "validated", 10), ("b2", "stored", 30)], 5)
    assert "before the oldest usable backup" in e.value.message


def test_pick_passes_over_a_backup_whose_manifest_is_damaged_and_says_so():
    from dbops.errors import ValidationError

    rows = [("b1", "validated", 10), ("b2", "validated", 20), ("b3", "stored", 30)]
    p = _pick(rows, 40, damaged=("b3",))
    assert p.chosen.backup_id == "b2" and p.fallback is None
    assert p.notes == ["backup b3 is passed over: its manifest is damaged in storage: manifest of backup b3 (k/b3) "
                       "is unreadable: ZstdError"]
    p = _pick(rows, 40, damaged=("b1",))  # the oldest unreadable: the earliest point is the next one's
    assert (p.chosen.backup_id, p.fallback.backup_id, p.oldest.backup_id) == ("b3", "b2", "b2")
    with pytest.raises(ValidationError) as e:  # every backup that fits is unreadable
        _pick(rows, 25, damaged=("b1", "b2"))
    assert "no readable backup fits" in e.value.message and "b1" in e.value.detail and "b2" in e.value.detail
    with pytest.raises(ValidationError):  # named with --backup: its error as it is
        _pick(rows, 40, backup_id="b3", damaged=("b3",))


def test_a_fallback_whose_wal_is_not_archived_is_dropped_with_a_note():
    from dbops.ops.restore.plan import fallback_reaches
    from dbops.pg.lsn import segment_of_lsn

    spans = walchain.chain(1, [])
    fb = BackupChoice("b1", "validated", 1, parse_lsn("0/3000028"), parse_lsn("0/3000100"), 10.0, 10.0, 1, "15")
    names = [f"0000000100000000000000{n:02X}" for n in range(3, 9)]
    chosen_run = rwal.wal_range(inv(names), spans, segment_of_lsn(1, parse_lsn("0/6000028"), SEG))
    notes = ["fallback: validated backup b1, restored instead if b2 turns out damaged in storage"]
    assert fallback_reaches(fb, chosen_run, inv(names), spans, SEG, notes) is fb and len(notes) == 1
    holed = [n for n in names if not n.endswith("04")]
    chosen_run = rwal.wal_range(inv(holed), spans, segment_of_lsn(1, parse_lsn("0/6000028"), SEG))
    assert fallback_reaches(fb, chosen_run, inv(holed), spans, SEG, notes) is None
    assert notes == ["no fallback: validated backup b1 cannot be restored to the target, WAL segment "
                     "000000010000000000000004 is missing from the archive"]


# --------------------------------------------------------------------------- the default timeline


def _archive_with_branches(tmp_path):
    """Timeline 2 forks from 1 at 0/5000000 (made at t=1000), timeline 3 from 1 at 0/3000000 (t=2000)."""
    import hashlib

    from dbops.ops.restore import wal as rwal
    from dbops.ops.wal.archive import META_SHA256, WalArchive
    from dbops.storage.layout import Layout
    from dbops.storage.local import LocalStore

    store, layout = LocalStore(tmp_path / "s"), Layout("p")
    for tli, text in ((2, "1\t0/5000000\tno recovery target specified\n"),
                      (3, "1\t0/3000000\tbefore 2026-11-29 23:00:00+00\n")):
        data = text.encode()
        store.put(layout.wal_key(f"{tli:08X}.history"), data, metadata={META_SHA256: hashlib.sha256(data).hexdigest()})
    inv = rwal.Inventory(16 * 2**20, histories={2, 3}, history_times={2: 1000.0, 3: 2000.0})
    inv.segments["000000010000000000000001"] = None
    return WalArchive(store, layout), inv


def _backup_at(tli: int, lsn: int, t: float):
    from dbops.repo.catalog import BackupInfo

    return BackupInfo("b", t, lsn, lsn - 0x100, tli, None, 1, 1)


def test_default_timeline_is_the_newest_that_held_the_time(tmp_path):
    from dbops.ops.restore.target import RestoreTarget
    from dbops.ops.restore.timeline import default_timeline

    arc, inv = _archive_with_branches(tmp_path)
    infos = [_backup_at(1, 0x2000000, 500.0)]
    at = lambda t: RestoreTarget(TIME, str(t), epoch=t)  # noqa: E731
    choice = lambda target, backups=infos: default_timeline(arc, inv, backups, target)[0][0]  # noqa: E731
    assert choice(at(900.0)) == 1  # before both branches: timeline 1 itself
    (tli, spans, notes), later = default_timeline(arc, inv, infos, at(1500.0))  # timeline 3 not made yet
    assert tli == 2 and [s.timeline for s in spans] == [1, 2] and "timeline 3" in notes[0]
    assert later == []  # timeline 3 does not branch from timeline 2
    assert choice(at(2500.0)) == 3  # both made: the newest, as PostgreSQL
    # A backup only on timeline 2's history beyond 3's fork: timeline 3 cannot reach it.
    assert choice(at(2500.0), [_backup_at(2, 0x6000000, 1200.0)]) == 2
    # Other targets follow the newest timeline.
    assert choice(RestoreTarget(LATEST, "latest")) == 3


def test_default_timeline_offers_the_branches_it_skipped_for_their_history_time(tmp_path):
    """A history file is archived a moment after its promotion: a commit made on the new timeline
    within that moment looks older than the branch, so the branch comes second, to try when the
    parent's archive ends before the target."""
    from dbops.ops.restore.target import RestoreTarget
    from dbops.ops.restore.timeline import default_timeline

    arc, inv = _archive_with_branches(tmp_path)
    (tli, _, _), later = default_timeline(arc, inv, [_backup_at(1, 0x2000000, 500.0)],
                                          RestoreTarget(TIME, "t", epoch=900.0))
    assert tli == 1
    assert [t for t, _, _ in later] == [2, 3]  # the nearest branch first; both fork from timeline 1
    assert all("ends before the target" in n[0] for _, _, n in later)
