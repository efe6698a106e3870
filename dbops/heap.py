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

Arenas (:func:`few_arenas`): glibc gives a thread that finds the arenas in use busy an arena of its
own, up to 8 per core, and memory freed in one stays with it. A full backup runs a copy pool, two
store pools with their upload pools and the validation's threads one after the other; measured
in-process at scale 400 (peak RSS): 127.5 MiB with glibc's default, 121.5 MiB with ``ARENAS``
(scale 100: 110 and 109 MiB).

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

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameters
M_ARENA_MAX = -8
LARGE = 1 << 20
ARENAS = 2
GC_THRESHOLDS = (50_000, 50, 100)  # young, middle and full collections (Python's: 700, 10, 10)

_set: set[int] = set()


def _mallopt(param: int, value: int) -> bool:
    """glibc's mallopt(param, value) for this process (once per parameter); False where the C
    library has no ``mallopt`` or refuses it (not glibc): nothing changes there."""
    if param in _set:
        return True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if mallopt(param, value) != 1:
        return False
    _set.add(param)
    return True


def map_large_buffers() -> bool:
    """Fix glibc's mmap threshold at ``LARGE`` for this process (once)."""
    return _mallopt(M_MMAP_THRESHOLD, LARGE)


def few_arenas() -> bool:
    """At most ``ARENAS`` malloc arenas for the threads created from now on (those that already
    have one keep it): call it before a run starts its thread pools."""
    return _mallopt(M_ARENA_MAX, ARENAS)


@contextmanager
def fewer_collections() -> Iterator[None]:
    """Python's collector at ``GC_THRESHOLDS`` (never lower than they are) inside, as before after."""
    before = gc.get_threshold()
    gc.set_threshold(*(max(a, b) for a, b in zip(GC_THRESHOLDS, before)))
    try:
        yield
    finally:
        gc.set_threshold(*before)
