"""The WAL fetched ahead while a backup's target is captured, and what fetch_wal keeps of it."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from walfake import SEG, make_data_dir, write_file, write_segment

from dbops.ops.backup.target import Target, fetch_wal, fetch_wal_ahead
from dbops.ops.wal.archive import WalArchive
from dbops.pg.walfile import cluster_identity
from dbops.storage.layout import Layout
from dbops.storage.local import LocalStore

CFG = SimpleNamespace(archive=SimpleNamespace(parallel=2), os_user="postgres")
HIST = b"1\t0/3800000\tno recovery target specified\n"  # timeline 2 forks inside segment 0x38


def seg(tli: int, n: int) -> str:
    return f"{tli:08X}00000000{n:08X}"


def archive(tmp_path, names, hist=None):
    store, layout = LocalStore(tmp_path / "store"), Layout("p")
    data = make_data_dir(tmp_path / "data")
    arc = WalArchive(store, layout, cluster_name="t")
    paths = [write_segment(data, n) for n in names]  # first: the identity takes their segment size
    if hist is not None:
        arc.push(write_file(data, "00000002.history", hist), cluster_identity(data))
    for p in paths:
        arc.push(p, cluster_identity(data))
    return store, layout


def test_ahead_fetches_what_is_archived_and_fetch_wal_keeps_only_what_replay_needs(tmp_path):
    # the old primary archived 0x38 on timeline 1 too (it diverges after the fork)
    store, layout = archive(tmp_path, [seg(1, 0x36), seg(1, 0x37), seg(1, 0x38), seg(2, 0x38), seg(2, 0x39),
                                       seg(2, 0x3A)], HIST)
    wal = tmp_path / "wal"
    wal.mkdir()
    fetch_wal_ahead(CFG, store, layout, seg(1, 0x36), SEG, wal, threading.Event())
    # on the start's timeline until a segment is missing (0x39 never was on timeline 1)
    assert sorted(p.name for p in wal.iterdir()) == [seg(1, 0x36), seg(1, 0x37), seg(1, 0x38)]
    target = Target(lsn=0x3900100, time=0.0, timeline=2, segment=seg(2, 0x39))
    fetch_wal(CFG, store, layout, seg(1, 0x36), target, wal)
    # timeline 1's 0x38 is not what replay to the target needs: gone; nothing past the target either
    assert sorted(p.name for p in wal.iterdir()) == sorted(
        ["00000002.history", seg(1, 0x36), seg(1, 0x37), seg(2, 0x38), seg(2, 0x39)])


def test_ahead_stops_when_told_and_fetch_wal_fetches_the_rest(tmp_path):
    store, layout = archive(tmp_path, [seg(1, n) for n in range(0x10, 0x18)])
    wal = tmp_path / "wal"
    wal.mkdir()
    enough = threading.Event()
    enough.set()
    fetch_wal_ahead(CFG, store, layout, seg(1, 0x10), SEG, wal, enough)
    assert not list(wal.iterdir())
    fetch_wal_ahead(CFG, store, layout, seg(1, 0x10), SEG, wal, threading.Event())
    assert len(list(wal.iterdir())) == 8  # to the end of the archive
    target = Target(lsn=0x1400010, time=0.0, timeline=1, segment=seg(1, 0x14))
    fetch_wal(CFG, store, layout, seg(1, 0x10), target, wal)
    assert sorted(p.name for p in wal.iterdir()) == [seg(1, n) for n in range(0x10, 0x15)]
