"""The restore download's memory: ranges read as streams, frame by frame, under a fixed byte
budget (dbops.repo.ranges.ByteBudget), in the clear and through the encryption layer."""

from __future__ import annotations

import random
import threading
import time

import pytest

from dbops.errors import DamagedObjectError, ValidationError
from dbops.repo import manifest as mf
from dbops.repo import ranges
from dbops.repo.ranges import ByteBudget
from dbops.repo.restore import restore_snapshot
from dbops.storage.crypt import EncryptedStore
from dbops.storage.cryptformat import HEADER, SEGMENT, STEP
from dbops.storage.layout import Layout
from dbops.storage.local import LocalStore
from test_backup_store import make_datadir, pages, snapshot
from test_encryption_units import new_key, ring


def test_budget_never_exceeded_and_a_request_larger_than_it_still_runs_alone():
    budget = ByteBudget(1000)
    held, peak, lock = [0], [0], threading.Lock()
    rnd = random.Random(3)
    sizes = [rnd.randint(1, 700) for _ in range(200)] + [5000, 1000, 1]  # 5000: more than the whole budget

    def work(n: int) -> None:
        got = budget.acquire(n)
        with lock:
            held[0] += n
            peak[0] = max(peak[0], held[0] if n <= 1000 else held[0] - n + got)
            assert held[0] - (n - got) <= 1000
        time.sleep(0.0005)
        with lock:
            held[0] -= n
        budget.release(got)

    threads = [threading.Thread(target=lambda part=sizes[i::8]: [work(n) for n in part]) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert budget.held == 0 and 0 < budget.peak <= 1000 and peak[0] <= 1000


def test_a_large_request_is_not_starved_by_small_ones():
    budget = ByteBudget(100)
    budget.acquire(60)
    order: list[str] = []
    big = threading.Thread(target=lambda: (budget.acquire(100), order.append("big"), budget.release(100)))
    big.start()
    time.sleep(0.05)  # the big request waits at the head of the queue
    small = threading.Thread(target=lambda: (budget.acquire(10), order.append("small"), budget.release(10)))
    small.start()
    time.sleep(0.05)
    assert order == []  # 30 bytes are free, but the small request queues behind the big one
    budget.release(60)
    big.join(timeout=10)
    small.join(timeout=10)
    assert order == ["big", "small"]


class SpyBudget(ByteBudget):
    made: list[ByteBudget] = []

    def __init__(self, limit: int):
        super().__init__(limit)
        SpyBudget.made.append(self)


@pytest.mark.parametrize("encrypted", [False, True])
def test_restore_under_a_budget_smaller_than_a_frame_completes_and_holds_it(tmp_path, monkeypatch, encrypted):
    base = LocalStore(tmp_path / "store")
    store = EncryptedStore(base, ring(new_key()), "c") if encrypted else base
    layout = Layout("c")
    d = make_datadir(tmp_path)
    (d / "base/5/big").write_bytes(pages(21, 300))  # 2.4 MB in many frames, several ranges
    m = snapshot(store, layout, d, "b1", parallel=2)
    monkeypatch.setattr(ranges, "MAX_RANGE_RAW", 512 * 1024)
    from dbops.repo import restore as restore_mod

    monkeypatch.setattr(restore_mod, "IN_FLIGHT_BYTES", 4096)  # less than any frame: one at a time
    monkeypatch.setattr(restore_mod, "ByteBudget", SpyBudget)
    SpyBudget.made.clear()
    stats = restore_snapshot(store, layout, mf.load(store, layout, "b1"), str(tmp_path / "r"), parallel=4)
    assert stats.requests > 1
    assert (tmp_path / "r/base/5/big").read_bytes() == (d / "base/5/big").read_bytes()
    assert (tmp_path / "r/base/5/16384").read_bytes() == (d / "base/5/16384").read_bytes()
    (budget,) = SpyBudget.made
    assert budget.held == 0 and budget.peak == 4096


def test_a_damaged_frame_in_the_middle_of_a_range_fails_naming_the_object_and_releases_the_budget(tmp_path,
                                                                                                  monkeypatch):
    store, layout = LocalStore(tmp_path / "store"), Layout("c")
    d = make_datadir(tmp_path)
    (d / "base/5/big").write_bytes(pages(22, 300))
    m = snapshot(store, layout, d, "b1", parallel=1)
    big = next(e for e in m.entries() if e.path == "base/5/big")
    ref = big.chunks[len(big.chunks) // 2]
    path = store.path_of(layout.pack(ref.pack))
    blob = bytearray(path.read_bytes())
    blob[ref.offset + ref.length // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    from dbops.repo import restore as restore_mod

    monkeypatch.setattr(restore_mod, "ByteBudget", SpyBudget)
    SpyBudget.made.clear()
    with pytest.raises(ValidationError) as e:
        restore_snapshot(store, layout, mf.load(store, layout, "b1"), str(tmp_path / "r"), parallel=3)
    assert "base/5/big is damaged in storage" in e.value.message and layout.pack(ref.pack) in e.value.detail
    assert SpyBudget.made[0].held == 0


def test_encrypted_open_range_reads_what_get_range_reads(tmp_path):
    raw = LocalStore(tmp_path / "s")
    s = EncryptedStore(raw, ring(new_key()), "pre")
    rnd = random.Random(7)
    for n in (1, SEGMENT, SEGMENT + 1, 40 * SEGMENT + 11):  # 40 segments: more than one batch read
        data = rnd.randbytes(n)
        s.put("pre/x", data)
        for a, ln in [(0, n), (n - 1, 5), (SEGMENT - 3, 7)] + [(rnd.randint(0, n - 1), rnd.randint(1, 20 * SEGMENT))
                                                               for _ in range(20)]:
            if a >= n:
                continue
            with s.open_range("pre/x", a, ln) as src:
                got = b""
                while part := src.read(rnd.randint(1, 3 * SEGMENT)):
                    got += part
            assert got == data[a:a + ln] == s.get_range("pre/x", a, ln)


def test_encrypted_open_range_refuses_a_flipped_byte_before_handing_out_its_segment(tmp_path):
    raw = LocalStore(tmp_path / "s")
    s = EncryptedStore(raw, ring(new_key()))
    data = random.Random(1).randbytes(30 * SEGMENT)
    s.put("o", data)
    p = raw.path_of("o")
    blob = bytearray(p.read_bytes())
    blob[HEADER + 25 * STEP + 100] ^= 1  # segment 25: in the second batch read
    p.write_bytes(bytes(blob))
    with s.open_range("o", 0, len(data)) as src:
        assert src.read(SEGMENT) == data[:SEGMENT]
        with pytest.raises(DamagedObjectError):
            while src.read(SEGMENT):
                pass
