"""Page deltas restored in one pipelined pass (dbops.repo.schedule): a batch's deltas are handed out
once its whole blocks are written, the next batch's whole blocks meanwhile; each delta's pages go
over its base block (dbops.repo.blocks.delta_writes); files complete with their own batch; a
failed range of whole blocks stops the handing out; bases and deltas spread over many ranges
and batches restore byte for byte. A batch whose deltas are small has them fetched first and
held (dbops.repo.held), applied over their bases as those are written: the same bytes, the same
errors; a batch over the bound is read in two passes."""

from __future__ import annotations

import pytest

from dbops.errors import ValidationError
from dbops.ops.restore.delta import restore_delta
from dbops.repo import blocks, held, ranges, schedule
from dbops.repo import manifest as mf
from dbops.repo.restore import restore_snapshot
from dbops.storage.layout import Layout
from dbops.storage.local import LocalStore
from test_page_deltas import PAGE, REL, Folder, _corrupt, files_of, page, snap

OTHER = "base/5/40001"


def test_delta_writes_put_exactly_the_masked_pages_in_runs():
    pages = b"A" * PAGE + b"B" * PAGE + b"C" * PAGE
    out = blocks.delta_writes(memoryview(pages), 0b1000_0110, 8 * PAGE)
    assert [(at, bytes(b)) for at, b in out] == [(PAGE, b"A" * PAGE + b"B" * PAGE), (7 * PAGE, b"C" * PAGE)]
    for data, mask, size in ((pages, 0b1, 8 * PAGE), (b"A" * PAGE, 1 << 8, 8 * PAGE), (b"A" * PAGE, 0, 8 * PAGE),
                             (b"A" * 100, 1, 8 * PAGE), (b"A" * PAGE, 1, 100)):
        with pytest.raises(ValueError):
            blocks.delta_writes(data, mask, size)


class TwoRelations(Folder):
    """The test folder with a second relation (its own batch when batches are small)."""

    def __init__(self, root):
        self.other = [page(0x1000000, f"q{i}") for i in range(128)]
        super().__init__(root)

    def write(self) -> None:
        super().write()
        (self.d / OTHER).write_bytes(b"".join(self.other))

    def change_other(self, lsn: int, *numbers: int) -> None:
        for n in numbers:
            self.other[n] = page(lsn, f"q{n}@{lsn:x}")
        self.write()


@pytest.fixture
def two(tmp_path):
    """b1 full; b2 with page deltas in both relations (their bases in b1's packs)."""
    store, layout, f = LocalStore(tmp_path / "store"), Layout("c"), TwoRelations(tmp_path)
    m1 = snap(store, layout, f, "b1", 0x2000000)
    f.change(0x2000100, 1, 9, 30, 61, 200, 255)
    f.change_other(0x2000100, 0, 5, 6, 70, 127)
    m2 = snap(store, layout, f, "b2", 0x3000000, m1)
    m2 = mf.load(store, layout, m2.backup_id)
    assert sum(1 for e in m2.entries() for c in e.chunks if c.mask) >= 8
    return store, layout, f, m2, files_of(f.d)


def test_deltas_come_after_their_batch_and_files_complete_with_it(two, monkeypatch):
    store, layout, f, m2, copy = two
    monkeypatch.setattr(ranges, "BATCH_BLOCKS", 1)  # one file a batch
    monkeypatch.setattr(ranges, "MAX_RANGE_RAW", 64 * 1024)  # several ranges of whole blocks per relation
    done: list[str] = []
    completion = schedule.Completion(lambda e: done.append(e.path))
    seen: list[tuple[int, str, bool]] = []  # (batch number, first file, a delta range)
    batches: list[schedule.Batch] = []
    for files, rng, left in completion.planned(m2):
        if not any(b is left for b in batches):
            batches.append(left)
        n = next(i for i, b in enumerate(batches) if b is left)
        path = files[rng.first_file].path
        if rng.deltas:
            assert left.bases_left == 0  # every whole block of its batch is written
            assert path not in done
        seen.append((n, path, rng.deltas))
        completion.written(files, rng, left)  # written at once, in the order handed out
    rel = [s for s in seen if s[1] == REL]
    other = [s for s in seen if s[1] == OTHER]
    assert sum(1 for s in rel if not s[2]) > 1 and any(s[2] for s in rel) and any(s[2] for s in other)
    # the next batch's whole blocks are handed out before this batch's deltas (pipelined)
    first_delta = next(i for i, s in enumerate(seen) if s[2])
    assert any(s[0] > seen[first_delta][0] and not s[2] for s in seen[:first_delta])
    with_content = sorted(e.path for e in m2.entries() if e.type == mf.FILE and e.chunks)
    assert sorted(done) == with_content  # each once


def test_a_failed_range_of_whole_blocks_stops_before_its_deltas(two, monkeypatch):
    store, layout, f, m2, copy = two
    monkeypatch.setattr(ranges, "BATCH_BLOCKS", 1)
    completion = schedule.Completion(lambda e: None)
    handed = []
    for files, rng, left in completion.planned(m2):
        handed.append((files[rng.first_file].path, rng.deltas))
        if files[rng.first_file].path == REL and not rng.deltas:
            completion.failed(left)  # as a worker reports a damaged range
        else:
            completion.written(files, rng, left)
    # the next batch's whole blocks were already handed out; no delta of either relation was
    assert (REL, False) in handed and (OTHER, False) in handed and not any(d for _p, d in handed)


class SpyHeld(held.Held):
    """Counts the deltas held and the pieces their runs were written in."""

    added = applied = 0

    def add(self, fr, stored, key):
        SpyHeld.added += len(fr.runs)
        super().add(fr, stored, key)

    def over(self, decoder, run, raw):
        pieces, why = super().over(decoder, run, raw)
        SpyHeld.applied += pieces is not None and len(pieces) > 1
        return pieces, why


@pytest.mark.parametrize("hold", [True, False])
@pytest.mark.parametrize("parallel", [1, 4])
def test_bases_and_deltas_in_many_ranges_and_batches_restore_byte_for_byte(two, tmp_path, monkeypatch, parallel,
                                                                           hold):
    store, layout, f, m2, copy = two
    monkeypatch.setattr(ranges, "BATCH_BLOCKS", 1)
    monkeypatch.setattr(ranges, "MAX_GAP", 0)
    monkeypatch.setattr(ranges, "MAX_RANGE", 1)  # one frame per range: bases and deltas each in their own
    monkeypatch.setattr(held, "HOLD_BYTES", held.HOLD_BYTES if hold else 0)  # 0: every batch in two passes
    monkeypatch.setattr(schedule, "Held", SpyHeld)
    SpyHeld.added = SpyHeld.applied = 0
    st = restore_snapshot(store, layout, m2, str(tmp_path / "r"), parallel=parallel)
    assert files_of(tmp_path / "r") == copy
    assert st.requests > 2 * len(m2.packs())
    deltas = sum(1 for e in m2.entries() for c in e.chunks if c.mask)
    assert (SpyHeld.added, SpyHeld.applied > 0) == ((deltas, True) if hold else (0, False))
    # restore --delta over an older copy: the same merge
    target = tmp_path / "d"
    restore_snapshot(store, layout, mf.load(store, layout, "b1"), str(target), parallel=parallel)
    restore_delta(store, layout, m2, target, parallel=parallel)
    assert files_of(target) == copy


def test_a_damaged_base_frame_in_a_later_batch_is_named(two, tmp_path, monkeypatch):
    store, layout, f, m2, copy = two
    monkeypatch.setattr(ranges, "BATCH_BLOCKS", 1)
    c = next(c for e in m2.entries() if e.path == OTHER for c in e.chunks if c.mask)
    key = layout.pack(c.base.pack)
    _corrupt(store, key, c.base.offset + c.base.length // 2)
    with pytest.raises(ValidationError) as ei:
        restore_snapshot(store, layout, m2, str(tmp_path / "r"), parallel=2)
    assert key in (ei.value.detail or "") and "damaged" in ei.value.message


def test_a_listing_has_every_entry_without_decoding_block_tables(two):
    store, layout, f, m2, copy = two
    full = list(m2.entries())
    listed = list(m2.listing())
    assert [(e.path, e.type, e.mode, e.mtime_ns, e.size, e.target) for e in listed] == \
        [(e.path, e.type, e.mode, e.mtime_ns, e.size, e.target) for e in full]
    assert all(not e.chunks for e in listed) and any(e.chunks for e in full)
    m2.check()  # loaded: its tables were checked then; the tablespace check runs on the listing


def test_a_batch_holds_its_deltas_within_the_bound_and_is_read_in_two_passes_over_it(two, monkeypatch):
    store, layout, f, m2, copy = two
    monkeypatch.setattr(ranges, "BATCH_BLOCKS", 1)  # one relation a batch
    sizes = {}
    for e in m2.entries():
        if any(c.mask for c in e.chunks):
            sizes[e.path] = sum(c.length for c in e.chunks if c.mask)
    assert set(sizes) == {REL, OTHER}
    monkeypatch.setattr(held, "HOLD_BYTES", max(sizes.values()) - 1)  # the larger batch over the bound
    fetched: list[str] = []

    def hold(files, rng):
        fetched.append(files[rng.first_file].path)
        return layout.pack(rng.pack), [(fr, b"") for fr in rng.frames]

    completion = schedule.Completion(lambda e: None, hold)
    seen = []
    for files, rng, left in completion.planned(m2):
        seen.append((files[rng.first_file].path, rng.deltas, left.held is not None))
        completion.written(files, rng, left)
    small, large = sorted(sizes, key=sizes.get)
    assert fetched and set(fetched) == {small}  # held: fetched when planned, never handed out as a range
    assert not any(d for p, d, _h in seen if p == small) and all(h for p, _d, h in seen if p == small)
    assert any(d for p, d, _h in seen if p == large) and not any(h for p, _d, h in seen if p == large)


def test_at_most_two_batches_hold_their_deltas_whatever_is_in_flight(tmp_path, monkeypatch):
    """Held deltas are bounded by batches, not by ranges in flight: a batch is planned (its deltas
    fetched and held) only once the one two batches before it is written, even when every range
    handed out is still being written (here: held up until the planning stops asking)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    f = Folder(tmp_path)
    extra = [f"base/5/{41000 + i}" for i in range(5)]
    for rel in extra:
        (f.d / rel).write_bytes(b"".join(page(0x1000000, f"{rel}:{n}") for n in range(16)))
    store, layout = LocalStore(tmp_path / "store"), Layout("c")
    m1 = snap(store, layout, f, "b1", 0x2000000)
    f.change(0x2000100, 1, 30)
    for rel in extra:
        (f.d / rel).write_bytes(b"".join(page(0x2000100 if n == 3 else 0x1000000, f"{rel}:{n}:{n == 3}")
                                         for n in range(16)))
    m2 = mf.load(store, layout, snap(store, layout, f, "b2", 0x3000000, m1).backup_id)
    monkeypatch.setattr(ranges, "BATCH_BLOCKS", 1)  # one relation a batch: six batches with deltas
    seen: list[schedule.Batch] = []
    handed: dict[int, int] = {}  # id(batch): its ranges handed out, less those written
    alive_at_hold: list[int] = []
    third = threading.Event()
    gate = threading.Event()
    lock = threading.Lock()

    def hold(files, rng):
        alive_at_hold.append(sum(1 for b in seen if b.held is not None and handed[id(b)] > 0))
        if len(alive_at_hold) >= 3:
            third.set()
        return layout.pack(rng.pack), [(fr, b"") for fr in rng.frames]

    completion = schedule.Completion(lambda e: None, hold)

    def items():
        for item in completion.planned(m2):
            if not any(b is item[2] for b in seen):
                seen.append(item[2])
            with lock:
                handed[id(item[2])] = handed.get(id(item[2]), 0) + 1
            yield item

    def write(item):
        gate.wait(30)
        with lock:  # before the planning learns of it
            handed[id(item[2])] -= 1
        completion.written(*item)

    # nothing is written until the planning has had every chance to run ahead (1 s), or did
    threading.Thread(target=lambda: (third.wait(1.0), gate.set()), daemon=True).start()
    with ThreadPoolExecutor(max_workers=4) as pool:
        ranges.run_bounded(pool, write, items(), 16)
    assert len(alive_at_hold) == 6  # every batch held its deltas
    assert max(alive_at_hold) <= 1  # the batch being planned and at most one other hold theirs
