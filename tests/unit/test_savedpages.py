"""The local bases: pg_waldump's block references (real PostgreSQL 15 lines), the pages a WAL
names mapped to segment files, and the side file of saved pages (a fall back for what is missing)."""

from __future__ import annotations

import os

from dbops.ops.backup.basesave import Predicted
from dbops.pg.waldump import BlockRef, block_refs
from dbops.repo.model import PAGE
from dbops.repo.savedpages import SavedPages, Saver, file_index, offsets_of, segment_key

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


def test_predicted_pages_cut_into_segment_files_and_paths_named_alike():
    p = Predicted()
    for spc, db, rel, blk in ((1663, 5, 16396, 3), (1663, 5, 16396, 131072 + 9), (1664, 0, 1262, 0),
                              (1663, 5, 16396, 3)):
        assert p.add(spc, db, rel, blk)
    assert {k: list(v) for k, v in p.segments().items()} == {
        (1663, 5, 16396, 0): [3], (1663, 5, 16396, 1): [9], (1664, 0, 1262, 0): [0]}
    assert segment_key("base/5/16396") == (1663, 5, 16396, 0)
    assert segment_key("base/5/16396.1") == (1663, 5, 16396, 1)
    assert segment_key("global/1262") == (1664, 0, 1262, 0)
    assert segment_key("pg_tblspc/16407/PG_15_202209061/5/16408.2") == (16407, 5, 16408, 2)
    for other in ("base/5/16396_fsm", "base/5/16396_vm.1", "base/5/pg_filenode.map", "global/pg_control",
                  "pg_wal/000000010000000000000001", "pg_tblspc/16407/5/16408", "base/5/PG_VERSION"):
        assert segment_key(other) is None, other


def _page(n: int) -> bytes:
    return bytes([n % 251]) * PAGE


def test_saved_pages_read_back_and_fall_back(tmp_path):
    root = tmp_path / "root"
    ts = tmp_path / "ts" / "PG_15_1" / "5"
    ts.mkdir(parents=True)
    (root / "base" / "5").mkdir(parents=True)
    (root / "pg_tblspc").mkdir()
    os.symlink(tmp_path / "ts", root / "pg_tblspc" / "16407")  # the store reads such a file by its real path
    rel = ts / "16408"
    rel.write_bytes(b"".join(_page(i) for i in range(10)))
    (root / "base" / "5" / "1259").write_bytes(_page(7) * 3)
    side = tmp_path / "side"
    saver = Saver(root, str(side))
    saver.file_done("base/5/1259")  # written before the prediction came: copied when it comes
    saver.file_done("base/5/1259_fsm")
    saver.file_done("base/5/1260")  # not predicted
    saver.predicted({(1663, 5, 1259, 0): [2], (16407, 5, 16408, 0): [0, 1, 2, 5, 9, 10, 11], (1663, 5, 9, 0): [0]})
    assert {k: dict(offsets_of(v)) for k, v in saver.index.items()} == {str((root / "base" / "5" / "1259").resolve()): {2: 0}}
    saver.file_done("pg_tblspc/16407/PG_15_1/5/16408")  # after it: copied at once
    saver.file_done("base/5/9")  # missing: left out
    saved = saver.finish()
    assert saved is not None
    try:
        assert saved.saved == 6  # pages 10 and 11 are past the end
        assert side.stat().st_size == 6 * PAGE
        key = saved.key(str(root / "pg_tblspc" / "16407" / "PG_15_1" / "5" / "16408"))
        assert key == str(rel.resolve()) and saved.key(str(tmp_path / "nothing")) is None
        assert saved.pages(key, 0, 0b111) == _page(0) + _page(1) + _page(2)
        assert saved.pages(key, 0, 0b100101) == _page(0) + _page(2) + _page(5)
        assert saved.pages(key, 8, 0b10) == _page(9)
        assert saved.pages(saved.key(str(root / "base" / "5" / "1259")), 2, 0b1) == _page(7)
        assert saved.pages(key, 0, 0b1000) is None  # page 3 not saved: the whole base is fetched instead
        assert saved.pages(None, 0, 0b1) is None
        assert (saved.hits, saved.misses) == (4, 2)
    finally:
        saved.close()


def test_files_written_before_the_prediction_are_held_a_few_bytes_each(tmp_path):
    (tmp_path / "base" / "5").mkdir(parents=True)
    for rel in (17, 40_000, 99_999):
        (tmp_path / "base" / "5" / str(rel)).write_bytes(_page(rel % 7) * 2)
    saver = Saver(tmp_path, str(tmp_path / "side"))
    for rel in range(100_000):  # many relations, written before the WAL was scanned
        saver.file_done(f"base/5/{rel}")
        saver.file_done(f"base/5/{rel}_fsm")  # not a relation segment: not kept
    assert len(saver.done) == sum(len(f"base/5/{rel}") + 1 for rel in range(100_000))  # about 13 bytes a file
    saver.predicted({(1663, 5, 17, 0): [1], (1663, 5, 40_000, 0): [0], (1663, 5, 99_999, 0): [0, 1],
                     (1663, 5, 12, 0): [0]})  # 12 is not there: left out
    assert not saver.done
    saved = saver.finish()
    assert saved is not None
    try:
        assert saved.saved == 4
        for rel, first, mask, want in ((17, 1, 0b1, _page(3)), (40_000, 0, 0b1, _page(2)),
                                       (99_999, 0, 0b11, _page(4) * 2)):
            assert saved.pages(saved.key(str(tmp_path / "base" / "5" / str(rel))), first, mask) == want
    finally:
        saved.close()


def test_a_saver_that_could_not_copy_saves_nothing(tmp_path):
    (tmp_path / "global").mkdir()
    (tmp_path / "global" / "1262").write_bytes(_page(1) * 4)
    saver = Saver(tmp_path, str(tmp_path / "side"))
    saver.predicted({(1664, 0, 1262, 0): [0, 1]})
    os.close(saver.out)  # the side file's descriptor gone (a read-only one in its place): the copy fails
    saver.out = os.open(tmp_path / "global" / "1262", os.O_RDONLY)
    saver.file_done("global/1262")
    assert saver.finish() is None and "global/1262" in (saver.problem or "")


def test_a_saver_keeps_within_its_limit(tmp_path):
    (tmp_path / "global").mkdir()
    for rel in ("1262", "1260"):
        (tmp_path / "global" / rel).write_bytes(_page(1) * 4)
    saver = Saver(tmp_path, str(tmp_path / "side"), limit=3 * PAGE)
    saver.predicted({(1664, 0, 1262, 0): [0, 1], (1664, 0, 1260, 0): [0, 1]})
    saver.file_done("global/1262")
    saver.file_done("global/1260")  # two more pages would pass the limit: left out, fetched instead
    saved = saver.finish()
    assert saved is not None
    try:
        assert saved.saved == 2 and (tmp_path / "side").stat().st_size == 2 * PAGE
        assert saved.pages(saved.key(str(tmp_path / "global" / "1260")), 0, 0b1) is None
        os.truncate(tmp_path / "side", PAGE)  # a side file that cannot give a page: fetched instead
        assert saved.pages(saved.key(str(tmp_path / "global" / "1262")), 0, 0b11) is None
        assert saved.pages(saved.key(str(tmp_path / "global" / "1262")), 0, 0b1) == _page(1)
    finally:
        saved.close()


def test_a_prediction_stops_at_its_limit_counting_each_page_once():
    p = Predicted(limit=4)
    for blk in (1, 2, 1, 2, 1, 2, 3):  # a page named again (once per checkpoint) is one page
        assert p.add(1663, 5, 100, blk)
    assert not p.full
    assert not p.add(1663, 5, 101, 0)  # the fourth page: full, the caller stops reading
    assert p.full and {k: list(v) for k, v in p.segments().items()} == {
        (1663, 5, 100, 0): [1, 2, 3], (1663, 5, 101, 0): [0]}


def test_the_compact_index_finds_each_page_and_nothing_else(tmp_path):
    side = tmp_path / "side"
    side.write_bytes(b"".join(_page(i) for i in range(4)))
    fi = file_index({9: 3 * PAGE, 2: 0, 5: PAGE, 6: 2 * PAGE})
    assert list(fi[0]) == [2, 5, 6, 9] and dict(offsets_of(fi)) == {2: 0, 5: PAGE, 6: 2 * PAGE, 9: 3 * PAGE}
    saved = SavedPages(str(side), {"f": fi})
    try:
        assert saved.saved == 4
        assert saved.pages("f", 2, 0b1) == _page(0) and saved.pages("f", 8, 0b10) == _page(3)
        assert saved.pages("f", 4, 0b110) == _page(1) + _page(2)
        assert saved.pages("f", 0, 0b1000) is None and saved.pages("f", 10, 0b1) is None
    finally:
        saved.close()


def test_a_prediction_near_its_limit_compacts_seldom_and_keeps_to_the_limit():
    p = Predicted(limit=1000)
    for blk in range(999):
        assert p.add(1663, 5, 100, blk)
    compactions = 0
    real = p.compact

    def counted() -> None:
        nonlocal compactions
        compactions += 1
        real()

    p.compact = counted  # type: ignore[method-assign]
    for _ in range(20):  # the same 999 pages named again and again: one page short of the limit
        for blk in range(999):
            assert p.add(1663, 5, 100, blk)
    assert compactions <= 21  # one per 999 additions (the count doubled), not one per addition
    for blk in range(999, 3000):  # past the limit: full, and no more than the limit kept
        if not p.add(1663, 5, 101, blk):
            break
    assert p.full and sum(len(v) for v in p.segments().values()) == 1000


def test_a_span_reads_a_files_saved_pages_at_once_and_gives_what_pages_gives(tmp_path):
    """A store reads a file's saved pages among one read's pages in one pread (a span): every base
    it gives is the one :meth:`SavedPages.pages` gives, byte for byte; a page not in the span (not
    saved, or outside it) is a miss; a file whose pages there are not one run of the side file gets no
    span (each delta's read alone), nor does a range with nothing saved or a side file cut short."""
    (tmp_path / "global").mkdir()
    (tmp_path / "global" / "1262").write_bytes(b"".join(_page(i) for i in range(40)))
    wanted = [1, 2, 3, 7, 8, 20, 21, 33, 39]
    saver = Saver(tmp_path, str(tmp_path / "side"))
    saver.predicted({(1664, 0, 1262, 0): wanted})
    saver.file_done("global/1262")
    saved = saver.finish()
    assert saved is not None
    try:
        key = saved.key(str(tmp_path / "global" / "1262"))
        span = saved.span(key, 0, 16)  # pages 0-15: 1, 2, 3, 7, 8 saved
        assert span is not None and len(span.data) == 5 * PAGE
        for first, mask in ((0, 0b1110), (0, 0b10000110), (1, 0b1), (7, 0b11), (0, 0b110000000)):
            assert span.pages(first, mask) == saved.pages(key, first, mask) == b"".join(
                _page(first + p) for p in range(16) if mask >> p & 1)
        before = saved.misses
        assert span.pages(0, 0b1) is None  # page 0 not saved
        assert span.pages(8, 0b11) is None  # page 9 not saved
        assert span.pages(15, 0b110000) is None  # page 20 saved, but outside the span
        assert saved.misses == before + 3
        assert saved.span(key, 9, 10) is None  # nothing saved in pages 9-18
        assert saved.span(None, 0, 16) is None
        whole = saved.span(key, 0, 40)
        assert whole is not None and whole.pages(32, 0b10000010) == _page(33) + _page(39)
        numbers, offsets = saved.index[key]  # pages 2 and 3 swapped in the side file: not one run
        saved.index[key] = (numbers, type(offsets)("Q", [offsets[0], offsets[2], offsets[1], *offsets[3:]]))
        assert saved.span(key, 0, 4) is not None  # 1, 2, 3 still one run of the side file, in another order
        assert saved.span(key, 0, 4).pages(1, 0b110) == saved.pages(key, 1, 0b110)
        saved.index[key] = (numbers, type(offsets)("Q", [offsets[0], offsets[1], offsets[-1], *offsets[3:]]))
        assert saved.span(key, 0, 4) is None  # page 3's far from pages 1 and 2: no span
        assert saved.pages(key, 1, 0b110) == _page(2) + _page(39)  # (what that index says)
        saved.index[key] = (numbers, offsets)
        os.truncate(tmp_path / "side", 3 * PAGE)
        assert saved.span(key, 0, 16) is None  # the side file cannot give them
    finally:
        saved.close()


def test_a_short_copy_of_saved_pages_saves_nothing(tmp_path, monkeypatch):
    """The kernel copies fewer bytes than the pages asked for (the file cut short between its size
    and the copy): that is the saver's problem, never pages recorded at offsets holding nothing."""
    import dbops.repo.savedpages as savedpages

    (tmp_path / "global").mkdir()
    (tmp_path / "global" / "1262").write_bytes(_page(1) * 4)
    real = savedpages.copy_range
    monkeypatch.setattr(savedpages, "copy_range", lambda src, dst, off, at, n: real(src, dst, off, at, n - PAGE))
    saver = Saver(tmp_path, str(tmp_path / "side"))
    saver.predicted({(1664, 0, 1262, 0): [0, 1, 2]})
    saver.file_done("global/1262")
    assert saver.finish() is None and "short copy of saved pages" in (saver.problem or "")
