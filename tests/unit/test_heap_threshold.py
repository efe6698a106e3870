"""dbops.heap: glibc's mmap threshold fixed for a restore (its 1 MiB buffers unmapped when freed), its
arenas limited for a full backup; the cyclic collector run less often during one, as before after."""

from __future__ import annotations

import subprocess
import sys


def test_large_buffers_are_mapped_on_their_own_after_a_larger_one_was_freed():
    # Without the fixed threshold, freeing a 16 MiB buffer raises glibc's threshold to 16 MiB, and
    # the 2 MiB buffers after it come from the heap: RSS keeps what they leave. With it, each
    # 2 MiB buffer is a mapping of its own, gone when freed: no more heap than before.
    probe = r"""
import sys
from dbops import heap
fixed = sys.argv[1] == "fixed"
if fixed:
    assert heap.map_large_buffers() and heap.map_large_buffers()
def heap_kib():
    lines = open("/proc/self/smaps").read().split("\n")
    for i, line in enumerate(lines):
        if line.endswith("[heap]"):
            return int(next(x for x in lines[i:] if x.startswith("Rss:")).split()[1])
    return 0
before = heap_kib()
big = bytearray(16 << 20); del big
keep = []
for n in range(20):
    buf = bytearray(2 << 20)
    keep.append(bytearray(64))  # a small live block after each buffer: the heap cannot shrink past it
    del buf
print(heap_kib() - before)
"""
    grown = {mode: int(subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True,
                                      check=True).stdout) for mode in ("fixed", "dynamic")}
    assert grown["fixed"] < 1024 <= grown["dynamic"], grown


def test_fewer_collections_inside_and_the_thresholds_as_before_after():
    import gc

    from dbops import heap

    before = gc.get_threshold()
    with heap.fewer_collections():
        # the first (young generation) threshold: the one every collector version keeps (3.14's
        # incremental collector reads the others differently and reports the third as 0)
        assert gc.get_threshold()[0] == max(heap.GC_THRESHOLDS[0], before[0]) >= 50_000
    assert gc.get_threshold() == before
    try:
        with heap.fewer_collections():
            raise KeyError("x")
    except KeyError:
        pass
    assert gc.get_threshold() == before


def test_few_arenas_keeps_new_threads_on_at_most_that_many_arenas():
    # glibc's malloc_stats (stderr) prints one "Arena N:" block per arena. Eight threads allocating
    # at once get an arena each by default (up to 8 per core); with few_arenas they share ARENAS.
    probe = r"""
import ctypes, sys, threading
from dbops import heap
if sys.argv[1] == "few":
    assert heap.few_arenas() and heap.few_arenas()
start, done = threading.Barrier(9), threading.Barrier(9)
def work():
    start.wait()
    keep = [bytearray(512) for _ in range(2000)]
    done.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads:
    t.start()
start.wait()
done.wait()
for t in threads:
    t.join()
ctypes.CDLL(None).malloc_stats()
"""
    arenas = {}
    for mode in ("few", "default"):
        r = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, check=True)
        arenas[mode] = sum(1 for line in r.stderr.splitlines() if line.startswith("Arena "))
    from dbops import heap

    assert 1 <= arenas["few"] <= heap.ARENAS < arenas["default"], arenas
