"""RPO and RTO arithmetic (dbops.ops.recovery), on the real ArchiveStatus shape."""

from dbops.ops import recovery
from dbops.ops.wal.status import ArchiveStatus, TimelineStatus

SEG = 16 * 1024 * 1024


def status(*timelines: TimelineStatus) -> ArchiveStatus:
    return ArchiveStatus(timelines=list(timelines), start=None, start_source="none", end=None, needed=0, gaps=[],
                         gap_count=0, histories=[], backup_labels=0, system_identifier="1", wal_segment_size=SEG)


def tl(n: int, newest: str | None, age: float | None) -> TimelineStatus:
    return TimelineStatus(timeline=n, segments=1 if newest else 0, oldest=newest, newest=newest, newest_age=age)


def archiver(lsn: str, tli: int = 1) -> dict:
    seg = int(lsn.split("/")[1], 16) // SEG + (int(lsn.split("/")[0], 16) << 32) // SEG
    return {"node": "pg1", "current_lsn": lsn, "current_wal": f"{tli:08X}{0:08X}{seg:08X}"}


def test_rpo_bytes_and_seconds_after_the_newest_archived_segment():
    st = status(tl(1, "000000010000000000000003", 42.0))
    # Segment 3 ends at 0/4000000; the primary is 0x1234 bytes into segment 4.
    r = recovery.rpo(st, archiver("0/4001234"))
    assert r["bytes"] == 0x1234 and r["seconds"] == 42.0
    assert r["archived_lsn"] == "0/4000000" and r["current_lsn"] == "0/4001234" and r["timeline"] == 1
    # Right after a segment switch nothing is at risk: 0 bytes and 0 seconds, however old the segment.
    r = recovery.rpo(st, archiver("0/4000000"))
    assert r["bytes"] == 0 and r["seconds"] == 0.0
    # Several segments behind: all of them count.
    r = recovery.rpo(st, archiver("0/7000010"))
    assert r["bytes"] == 3 * SEG + 0x10


def test_rpo_just_after_a_promotion_uses_the_previous_timeline():
    st = status(tl(1, "000000010000000000000005", 3.0), tl(3, None, None))
    r = recovery.rpo(st, archiver("0/6000100", tli=2))
    assert r["newest_segment"] == "000000010000000000000005" and r["bytes"] == 0x100 and r["timeline"] == 2


def test_rpo_without_a_primary_or_without_an_archive():
    st = status(tl(1, "000000010000000000000005", 7.5))
    r = recovery.rpo(st, None)
    assert r["bytes"] is None and r["seconds"] == 7.5 and "no reachable primary" in r["note"]
    r = recovery.rpo(status(), archiver("0/2000028"))
    assert r["bytes"] == 0x2000028 and r["seconds"] is None and r["note"] == "nothing archived yet"


def test_rto_is_the_newest_measured_restore():
    rows = [{"backup_id": "a", "restore_seconds": 9.0, "restore_measured_at": 100.0},
            {"backup_id": "b", "restore_seconds": 7.5, "restore_measured_at": 200.0},
            {"backup_id": "c", "restore_seconds": None, "restore_measured_at": None}]
    r = recovery.rto(rows, now=260.0)
    assert (r["seconds"], r["backup_id"], r["measured_at"], r["measured_age"]) == (7.5, "b", 200.0, 60.0)
    r = recovery.rto(rows[2:])
    assert r["seconds"] is None and "no restore measured yet" in r["note"]
    m = recovery.metrics({"seconds": 1.5, "bytes": 10}, r)
    assert m["dbops_rpo_seconds"][0] == 1.5 and m["dbops_rpo_bytes"][0] == 10 and m["dbops_rto_seconds"][0] is None
