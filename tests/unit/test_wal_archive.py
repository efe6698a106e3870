"""WAL archive logic against LocalStore: push/fetch round trips, idempotency, conflicts,
foreign clusters, verification on fetch, timeline chains, gaps and range fetches."""

from __future__ import annotations

import hashlib
import json

import pytest
from walfake import SEG, SYSID, make_data_dir, segment_bytes, write_file, write_segment

from dbops.config import CompressionSettings
from dbops.errors import ConflictError, ExitCode, NotFoundError, ValidationError
from dbops.pg import walchain
from dbops.ops.wal import status as walstatus
from dbops.ops.wal.archive import META_COMPRESSION, META_SHA256, WalArchive, fetch_range
from dbops.pg.walfile import (
    ClusterIdentity,
    cluster_identity,
    data_dir_of,
    read_header,
)
from dbops.pg.lsn import parse_history
from dbops.storage.layout import Layout
from dbops.storage.local import LocalStore

S1 = "000000010000000000000001"
S2 = "000000010000000000000002"


@pytest.fixture
def env(tmp_path):
    store = LocalStore(tmp_path / "store")
    layout = Layout("p")
    data = make_data_dir(tmp_path / "data")
    return store, layout, data, WalArchive(store, layout, cluster_name="t")


def ident(data):
    return cluster_identity(data)


def test_header_and_identity_are_read_from_disk(env):
    _store, _layout, data, _arc = env
    p = write_segment(data, S1)
    hdr = read_header(p)
    assert (hdr.system_identifier, hdr.segment_size, hdr.pageaddr) == (SYSID, SEG, SEG)
    assert cluster_identity(data, p) == ClusterIdentity(SYSID, 15, SEG)
    assert data_dir_of(p) == data


@pytest.mark.parametrize("algorithm", ["zstd", "none"])
def test_push_then_fetch_is_byte_identical(env, tmp_path, algorithm):
    store, layout, data, _ = env
    arc = WalArchive(store, layout, compression=CompressionSettings(algorithm, 3))
    p = write_segment(data, S1)
    res = arc.push(p, ident(data))
    assert not res.already_archived
    info = store.head(layout.wal_key(S1))
    assert info.metadata[META_SHA256] == hashlib.sha256(p.read_bytes()).hexdigest()
    assert info.metadata[META_COMPRESSION] == algorithm
    if algorithm == "zstd":
        assert info.size < SEG / 2
    out = tmp_path / "restored"
    arc.fetch(S1, out)
    assert out.read_bytes() == p.read_bytes()
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".restored")]


def test_first_push_claims_the_archive(env):
    store, layout, data, arc = env
    arc.push(write_segment(data, S1), ident(data))
    owner = json.loads(store.get(layout.identity()))
    assert (owner["system_identifier"], owner["pg_major"], owner["wal_segment_size"]) == (str(SYSID), 15, SEG)


def test_identical_repush_succeeds_without_rewriting(env):
    store, layout, data, arc = env
    p = write_segment(data, S1)
    arc.push(p, ident(data))
    before = store.head(layout.wal_key(S1)).last_modified
    res = WalArchive(store, layout).push(p, ident(data))
    assert res.already_archived and res.stored_bytes == 0
    assert store.head(layout.wal_key(S1)).last_modified == before


def test_conflicting_push_fails_loudly_and_leaves_the_object(env):
    store, layout, data, arc = env
    p = write_segment(data, S1, seed=1)
    arc.push(p, ident(data))
    stored = store.get(layout.wal_key(S1))
    old_sha = hashlib.sha256(p.read_bytes()).hexdigest()
    p.write_bytes(segment_bytes(S1, seed=2))
    new_sha = hashlib.sha256(p.read_bytes()).hexdigest()
    with pytest.raises(ConflictError) as ei:
        arc.push(p, ident(data))
    assert ei.value.exit_code == ExitCode.CONFLICT == 13
    assert old_sha in ei.value.detail and new_sha in ei.value.detail
    assert store.get(layout.wal_key(S1)) == stored


def test_foreign_cluster_is_refused(env, tmp_path):
    store, layout, data, arc = env
    arc.push(write_segment(data, S1), ident(data))
    other = make_data_dir(tmp_path / "other", sysid=42)
    p = write_segment(other, S2, sysid=42)
    with pytest.raises(ConflictError) as ei:
        WalArchive(store, layout).push(p, ident(other))
    assert "another cluster" in ei.value.message and "42" in ei.value.detail
    assert store.head(layout.wal_key(S2)) is None


def test_other_major_version_is_refused(env, tmp_path):
    store, layout, data, arc = env
    arc.push(write_segment(data, S1), ident(data))
    newer = make_data_dir(tmp_path / "newer", major=16)
    with pytest.raises(ConflictError):
        WalArchive(store, layout).push(write_segment(newer, S2), ident(newer))


def test_segment_from_another_cluster_in_this_pg_wal_is_refused(env):
    _store, _layout, data, arc = env
    p = write_segment(data, S1, sysid=99)
    with pytest.raises(ConflictError, match="another cluster"):
        arc.push(p, ident(data))


def test_truncated_or_misnamed_segments_are_refused(env):
    _store, layout, data, arc = env
    p = write_segment(data, S1)
    p.write_bytes(p.read_bytes()[: SEG // 2])
    with pytest.raises(ValidationError, match="truncated|bytes"):
        arc.push(p, ident(data))
    q = data / "pg_wal" / S2
    q.write_bytes(segment_bytes(S1))  # S1's content under S2's name
    with pytest.raises(ValidationError, match="address"):
        arc.push(q, ident(data))
    assert arc.store.head(layout.wal_key(S2)) is None


def test_fetch_of_a_missing_file_is_not_found(env, tmp_path):
    _store, _layout, _data, arc = env
    with pytest.raises(NotFoundError) as ei:
        arc.fetch("00000002.history", tmp_path / "x")
    assert ei.value.exit_code == 9
    assert not (tmp_path / "x").exists()


def test_fetch_refuses_a_damaged_object(env, tmp_path):
    store, layout, data, arc = env
    arc.push(write_segment(data, S1), ident(data))
    obj = store.root / "objects" / layout.wal_key(S1)
    raw = bytearray(obj.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    obj.write_bytes(bytes(raw))
    with pytest.raises(ValidationError):
        arc.fetch(S1, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".out")]


def test_history_partial_and_backup_files(env, tmp_path):
    _store, layout, data, arc = env
    hist = b"1\t0/3000000\tno recovery target specified\n"
    files = {
        "00000002.history": write_file(data, "00000002.history", hist),
        S1 + ".partial": data / "pg_wal" / (S1 + ".partial"),
        "000000010000000000000001.00000028.backup": write_file(
            data, "000000010000000000000001.00000028.backup", b"START WAL LOCATION: 0/1000028\n"),
    }
    files[S1 + ".partial"].write_bytes(segment_bytes(S1))
    for name, p in files.items():
        arc.push(p, ident(data))
        arc.fetch(name, tmp_path / name)
        assert (tmp_path / name).read_bytes() == p.read_bytes()
    assert layout.wal_key("00000002.history").endswith("wal/history/00000002.history")
    assert arc.history(2) == parse_history(hist.decode())


# --------------------------------------------------------------------------- timelines, gaps, ranges


def _seg(tli, n):
    return f"{tli:08X}00000000{n:08X}"


def test_needed_segments_follow_a_timeline_switch():
    # timeline 1 left at 0/3800000 (inside segment 3 for 16 MiB... here 1 MiB segments: segment 0x38)
    spans = walchain.chain(2, [(1, 0x3800000 + 0x123, "")])
    names = walchain.needed_segments(_seg(1, 0x36), _seg(2, 0x3A), spans, SEG)
    assert names == [_seg(1, 0x36), _seg(1, 0x37), _seg(2, 0x38), _seg(2, 0x39), _seg(2, 0x3A)]
    # a switch exactly on a segment boundary
    spans = walchain.chain(2, [(1, 0x3800000, "")])
    assert walchain.needed_segments(_seg(1, 0x37), _seg(2, 0x38), spans, SEG) == [_seg(1, 0x37), _seg(2, 0x38)]
    with pytest.raises(ValidationError, match="not an ancestor"):
        walchain.needed_segments(_seg(3, 0x30), _seg(2, 0x38), spans, SEG)


def _archive_series(env, names, hist: bytes | None = None):
    _store, _layout, data, arc = env
    paths = [write_segment(data, n) for n in names]
    if hist is not None:  # history files go first, as PostgreSQL's archiver sends them
        arc.push(write_file(data, "00000002.history", hist), ident(data))
    for p in paths:
        arc.push(p, ident(data))


def test_status_reports_newest_per_timeline_and_gaps_by_name(env):
    store, layout, _data, _ = env
    _archive_series(env, [_seg(1, n) for n in (1, 2, 4, 5)])
    st = walstatus.archive_status(store, layout)
    assert st.start == _seg(1, 1) and st.end == _seg(1, 5)
    assert st.gaps == [_seg(1, 3)] and not st.ok
    assert [(t.timeline, t.segments, t.newest) for t in st.timelines] == [(1, 4, _seg(1, 5))]
    assert st.timelines[0].newest_age is not None and st.timelines[0].newest_age < 60
    with pytest.raises(ValidationError) as ei:
        walstatus.require_no_gaps(st)
    assert ei.value.exit_code == 7 and _seg(1, 3) in ei.value.message
    # from a given start after the hole: complete
    st = walstatus.archive_status(store, layout, start_segment=_seg(1, 4))
    assert st.ok and st.needed == 2
    text = walstatus.metrics_text(st, "c1")
    assert 'dbops_wal_archive_ok{cluster="c1"} 1' in text and 'dbops_wal_segments{cluster="c1",timeline="1"} 4' in text


def test_status_follows_history_and_requires_history_files(env):
    store, layout, _data, _ = env
    hist = b"1\t0/3800000\tno recovery target specified\n"
    _archive_series(env, [_seg(1, 0x36), _seg(1, 0x37), _seg(2, 0x38), _seg(2, 0x39)], hist)
    st = walstatus.archive_status(store, layout)
    assert st.ok, st.gaps
    assert st.end == _seg(2, 0x39) and st.needed == 4
    store.delete(layout.wal_key("00000002.history"))
    st = walstatus.archive_status(store, layout)
    assert "00000002.history" in st.gaps


def test_fetch_range_follows_the_timeline_and_verifies(env, tmp_path):
    store, layout, data, _ = env
    hist = b"1\t0/3800000\tno recovery target specified\n"
    names = [_seg(1, 0x36), _seg(1, 0x37), _seg(2, 0x38), _seg(2, 0x39)]
    _archive_series(env, names, hist)
    dest = tmp_path / "replay"
    res = fetch_range(store, layout, _seg(1, 0x36), _seg(2, 0x39), dest, parallel=3)
    assert res.segments == names and res.histories == ["00000002.history"]
    for n in names:
        assert (dest / n).read_bytes() == (data / "pg_wal" / n).read_bytes()
    assert (dest / "00000002.history").read_bytes() == hist
    # by LSN on timeline 2
    dest2 = tmp_path / "replay2"
    res = fetch_range(store, layout, _seg(1, 0x37), 0x3900010, dest2, timeline=2)
    assert res.segments == names[1:]


def test_fetch_range_tells_a_hole_from_the_end_of_the_archive(env, tmp_path):
    store, layout, _data, _ = env
    _archive_series(env, [_seg(1, n) for n in (1, 2, 4)])
    with pytest.raises(ValidationError, match=_seg(1, 3)):
        fetch_range(store, layout, _seg(1, 1), _seg(1, 4), tmp_path / "a")
    with pytest.raises(NotFoundError, match=_seg(1, 5)):
        fetch_range(store, layout, _seg(1, 4), _seg(1, 5), tmp_path / "b")


def test_gaps_are_checked_from_the_oldest_backups_start(env):
    from dbops.repo import manifest as mf

    store, layout, _data, _ = env
    _archive_series(env, [_seg(1, n) for n in (1, 2, 4, 5, 6)])
    assert walstatus.oldest_backup_start(store, layout) is None
    for backup_id, redo_seg, t in (("b-new", 5, 2000.0), ("b-old", 4, 1000.0)):
        pg = mf.PgState("15", str(SYSID), 1, redo_seg * SEG + 0x28, redo_seg * SEG + 0x100, t, SEG)
        mf.save(store, layout, mf.Manifest(backup_id=backup_id, pg=pg, chunk_size=65536,
                                           compression={"algorithm": "zstd", "level": 3}, files=[]))
    start = walstatus.oldest_backup_start(store, layout)
    assert start == _seg(1, 4)
    st = walstatus.archive_status(store, layout, start_segment=start, start_source="oldest backup")
    assert st.ok and st.needed == 3 and st.start_source == "oldest backup"
