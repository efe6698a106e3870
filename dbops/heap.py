"""Memory management for a long transfer: the C heap's large buffers given back to the system as
soon as they are freed (glibc), and Python's cyclic garbage collector run less often.

glibc serves a buffer of ``M_MMAP_THRESHOLD`` bytes or more with a mapping of its own, unmapped
when it is freed; but it raises that threshold to the size of the largest such buffer freed (up
to 32 MiB), after which buffers of a few MiB come from the heap, whose freed memory stays with
the process, scattered between live blocks. A restore frees buffers of 1-2 MiB all along (each
range in flight reads its stream 1 MiB at a time, :data:`dbops.repo.ranges.READ_AHEAD`), so its
resident memory crept up with the bytes restored. With the threshold fixed at ``LARGE`` (which
also stops glibc moving it), measured on a scale-100 incremental's files (4 workers): peak RSS
110 MiB against 123 MiB; thresholds of 256 KiB and 1 MiB gave the same, 4 MiB and 16 MiB did not.

The collector (:func:`fewer_collections`): a restore creates and drops a few objects a block (plan
records, frames, runs); with the default thresholds (a young collection every 700 allocations, a
full one every 100 young ones) the full collections walk every live object again and again,
the batch's plan and the manifest's records included. Measured restoring an incremental's files
on one thread: scale 100 3.5 -> 3.0-3.3 s of CPU, scale 400 18.3 -> 14.5 s, with
``GC_THRESHOLDS``. What a restore allocates holds no reference cycles worth collecting sooner:
its cyclic garbage (an exception's traceback) is collected a little later, nothing more.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Iterator
from contextlib import contextmanager

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
LARGE = 1 << 20
GC_THRESHOLDS = (50_000, 50, 100)  # young, middle and full collections (Python's: 700, 10, 10)

_set = False


def map_large_buffers() -> bool:
    """Fix glibc's mmap threshold at ``LARGE`` for this process (once); False where the C library
    has no ``mallopt`` or refuses it (not glibc): nothing changes there."""
    global _set
    if _set:
        return True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _set = mallopt(M_MMAP_THRESHOLD, LARGE) == 1
    return _set


@contextmanager
def fewer_collections() -> Iterator[None]:
    """Python's collector at ``GC_THRESHOLDS`` (never lower than they are) inside, as before after."""
    before = gc.get_threshold()
    gc.set_threshold(*(max(a, b) for a, b in zip(GC_THRESHOLDS, before)))
    try:
        yield
    finally:
        gc.set_threshold(*before)
