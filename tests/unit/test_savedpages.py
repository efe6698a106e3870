"""The local bases: pg_waldump's block references (real PostgreSQL 15 lines), the pages a WAL
names mapped to segment files, and the side file of saved pages (a fall back for what is missing)."""

from __future__ import annotations

import os

from dbops.ops.backup.basesave import wanted_files
from dbops.pg.waldump import BlockRef, block_refs
from dbops.repo.model import PAGE
from dbops.repo.savedpages import SavedPages

# Printed by pg_waldump 15 --fullpage --fork=main on a pgbench run.
UPDATE = ("rmgr: Heap        len (rec/tot):     73/  3001, tx:        741, lsn: 0/08010978, prev 0/0800E998, "
          "desc: UPDATE off 45 xmax 741 flags 0x03 ; new off 22 xmax 0, blkref #0: rel 1663/5/16396 blk 1639 FPW, "
          "blkref #1: rel 1663/5/16396 blk 1562")
VISIBLE = ("rmgr: Heap2       len (rec/tot):     64/  8256, tx:          0, lsn: 0/08F281C0, prev 0/08F28180, "
           "desc: VISIBLE cutoff xid 780 flags 0x01, blkref #0: rel 1663/5/16396 fork vm blk 0 FPW, "
           "blkref #1: rel 1663/5/16396 blk 1639")
HINT = ("rmgr: XLOG        len (rec/tot):     49/  8193, tx:          0, lsn: 0/051F2058, prev 0/051F1FC8, "
        "desc: FPI_FOR_HINT , blkref #0: rel 16407/5/16408 blk 0 FPW")
FSM = ("rmgr: XLOG        len (rec/tot):     49/  8241, tx:        781, lsn: 0/080AF0D0, prev 0/080AD0F0, "
       "desc: FPI_FOR_HINT , blkref #0: rel 1663/5/16396 fork fsm blk 2 FPW")
CREATE = ("rmgr: Storage     len (rec/tot):     42/    42, tx:        740, lsn: 0/08007AD0, prev 0/08007AA0, "
          "desc: CREATE base/5/16413")


def test_block_refs_of_real_pg15_lines():
    assert block_refs(UPDATE) == [BlockRef(1663, 5, 16396, "main", 1639), BlockRef(1663, 5, 16396, "main", 1562)]
    assert block_refs(VISIBLE) == [BlockRef(1663, 5, 16396, "vm", 0), BlockRef(1663, 5, 16396, "main", 1639)]
    assert block_refs(HINT) == [BlockRef(16407, 5, 16408, "main", 0)]
    assert block_refs(FSM) == [BlockRef(1663, 5, 16396, "fsm", 2)]
    assert block_refs(CREATE) == [] and block_refs("pg_waldump: error: could not find file") == []
    # PostgreSQL 16 puts commas between the parts
    assert block_refs("desc: X, blkref #0: rel 1663/5/16396, fork vm, blk 7 FPW") == [BlockRef(1663, 5, 16396, "vm", 7)]
    assert block_refs("desc: X, blkref #0: rel 1663/5/16396, blk 7") == [BlockRef(1663, 5, 16396, "main", 7)]


def test_wanted_files_cut_relations_into_segments_and_find_tablespace_folders(tmp_path):
    data = tmp_path / "data"
    (data / "pg_tblspc").mkdir(parents=True)
    ts = tmp_path / "ts"
    (ts / "PG_15_202209061").mkdir(parents=True)
    os.symlink(ts, data / "pg_tblspc" / "16407")
    (tmp_path / "ts2" / "PG_15_1").mkdir(parents=True)
    (tmp_path / "ts2" / "PG_16_2").mkdir(parents=True)  # two version folders: unclear, left out
    os.symlink(tmp_path / "ts2", data / "pg_tblspc" / "16500")
    got = wanted_files(data, {(1663, 5, 16396): {3, 131072 + 9}, (1664, 0, 1262): {0},
                              (16407, 5, 16408): {1}, (16500, 5, 1): {2}, (16600, 5, 1): {2}})
    assert got == {str(data / "base/5/16396"): [3], str(data / "base/5/16396.1"): [9],
                   str(data / "global/1262"): [0],
                   str(data / "pg_tblspc/16407/PG_15_202209061/5/16408"): [1]}


def _page(n: int) -> bytes:
    return bytes([n % 251]) * PAGE


def test_saved_pages_read_back_and_fall_back(tmp_path):
    rel = tmp_path / "rel"
    rel.write_bytes(b"".join(_page(i) for i in range(10)))
    link = tmp_path / "link"
    os.symlink(tmp_path, link)
    side = tmp_path / "side"
    saved = SavedPages.save({str(link / "rel"): [0, 1, 2, 5, 9, 10, 11], str(tmp_path / "missing"): [0]}, str(side))
    try:
        assert saved.saved == 5  # pages 10 and 11 are past the end, the missing file is left out
        assert side.stat().st_size == 5 * PAGE
        key = saved.key(str(rel))  # the store reads the file by another path: its real path matches
        assert key == str(rel.resolve()) and saved.key(str(tmp_path / "other")) is None
        assert saved.pages(key, 0, 0b111) == _page(0) + _page(1) + _page(2)
        assert saved.pages(key, 0, 0b100101) == _page(0) + _page(2) + _page(5)
        assert saved.pages(key, 8, 0b10) == _page(9)
        assert saved.pages(key, 0, 0b1000) is None  # page 3 not saved: the whole base is fetched instead
        assert saved.pages(None, 0, 0b1) is None
        assert (saved.hits, saved.misses) == (3, 2)
    finally:
        saved.close()
