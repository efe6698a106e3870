"""A durable restore's writes (``rangewrite.Flusher``): their writeback started as a range goes, then
waited for and their pages dropped from the page cache, so the cache a restore dirties stays at a
few windows instead of the size of the database; a writeback error is raised, never dropped."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys

import pytest

from dbops.repo import rangewrite as rmod

MIB = 1 << 20


def resident_pages(path) -> int:
    """Pages of the file in the page cache (mincore over a read-only mapping of it)."""
    size = os.path.getsize(path)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    libc.mmap.restype = ctypes.c_void_p
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = ctypes.create_string_buffer(pages)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            pytest.skip(f"mmap: {os.strerror(ctypes.get_errno())}")
        try:
            if libc.mincore(addr, size, vec) != 0:
                pytest.skip(f"mincore: {os.strerror(ctypes.get_errno())}")
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec.raw)


def write_through_flusher(path, total: int, kept=None) -> None:
    block = os.urandom(128 * 1024)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fl = rmod.Flusher(kept)
        for off in range(0, total, len(block)):
            rmod.write_all(fd, block, off)
            fl.wrote(fd, off, len(block))
        fl.all()
    finally:
        os.close(fd)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_a_range_written_durably_leaves_no_pages_behind(tmp_path):
    path = tmp_path / "f"
    total = 48 * MIB
    write_through_flusher(path, total)
    if getattr(rmod, "_refused", [False])[0]:
        pytest.skip("the file system refuses sync_file_range")
    assert path.stat().st_size == total
    # every window written back and dropped: what stays cached is a few pages at most, not 48 MiB
    assert resident_pages(path) * mmap.PAGESIZE < 1 * MIB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_a_restores_first_pages_stay_cached(tmp_path):
    """Up to the restore's limit (``Kept``) the pages written stay cached, as before (the replay that
    follows reads them); past it they are dropped. Shared by the restore's ranges."""
    kept = rmod.Kept(24 * MIB)
    write_through_flusher(tmp_path / "a", 16 * MIB, kept)
    write_through_flusher(tmp_path / "b", 32 * MIB, kept)
    if rmod._refused[0]:
        pytest.skip("the file system refuses sync_file_range")
    assert resident_pages(tmp_path / "a") * mmap.PAGESIZE == 16 * MIB
    assert resident_pages(tmp_path / "b") * mmap.PAGESIZE == 8 * MIB  # its first window; the rest dropped


def test_the_content_is_what_was_written(tmp_path):
    path = tmp_path / "f"
    blocks = [os.urandom(100_000) for _ in range(200)]
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fl = rmod.Flusher()
        off = 0
        for b in blocks:
            rmod.write_all(fd, b, off)
            fl.wrote(fd, off, len(b))
            off += len(b)
        fl.all()
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(blocks)


def test_a_writeback_error_is_raised(tmp_path):
    """An error sync_file_range reports is raised with its errno (reported once, the file's fsync
    would not see it again), not taken for a file system that does not support the call."""
    if rmod._sync_file_range() is None:
        pytest.skip("no sync_file_range here")
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    with pytest.raises(OSError) as e:
        rmod._start_writeback(fd, 0, MIB)  # a closed descriptor: EBADF
    assert e.value.errno == errno.EBADF
    assert not rmod._refused[0]


def _scratch_restore(tmp_path, monkeypatch, **kw):
    """A 24 MiB file backed up and restored as a validation's scratch copy (not durable), with the
    restore's pages kept cached up to 0 bytes (every window past it dropped when dropping): its bytes
    in the page cache once restored; its content checked after."""
    from dbops.repo import manifest as mf
    from dbops.repo import restore as restore_mod
    from dbops.storage.layout import Layout
    from dbops.storage.local import LocalStore
    from test_backup_store import make_datadir, pages, snapshot

    store, layout = LocalStore(tmp_path / "store"), Layout("c")
    d = make_datadir(tmp_path)
    (d / "base/5/big").write_bytes(pages(31, 3072))
    snapshot(store, layout, d, "b1", parallel=2)
    monkeypatch.setattr(restore_mod, "Kept", lambda: rmod.Kept(0))
    restore_mod.restore_snapshot(store, layout, mf.load(store, layout, "b1"), str(tmp_path / "r"), parallel=2,
                                 durable=False, **kw)
    got = tmp_path / "r/base/5/big"
    resident = resident_pages(got) * mmap.PAGESIZE  # before the file is read back to be compared
    assert got.read_bytes() == (d / "base/5/big").read_bytes()
    return resident


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_a_scratch_copy_told_to_drop_its_pages_leaves_none_behind(tmp_path, monkeypatch):
    """``drop_cache=True`` (``backup.scratch_cache``): the validation's copy, not durable, is written
    back and dropped as it goes, its content the same."""
    resident = _scratch_restore(tmp_path, monkeypatch, drop_cache=True)
    if rmod._refused[0]:
        pytest.skip("the file system refuses sync_file_range")
    assert resident < 1 * MIB


def test_a_scratch_copy_keeps_its_pages_by_default(tmp_path, monkeypatch):
    assert _scratch_restore(tmp_path, monkeypatch) == 24 * MIB


def test_a_copy_stays_cached_up_to_the_memory_available(monkeypatch):
    from dbops.runtime import scratch

    assert scratch.copy_stays_cached(20 << 30, available=20 << 30)
    assert not scratch.copy_stays_cached((20 << 30) + 1, available=20 << 30)
    monkeypatch.setattr(scratch, "memory_available", lambda: None)  # unknown (not Linux): kept, as before
    assert scratch.copy_stays_cached(1 << 50)
    monkeypatch.setattr(scratch, "memory_available", lambda: 8 << 30)
    assert scratch.copy_stays_cached(8 << 30) and not scratch.copy_stays_cached(9 << 30)


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="Linux's /proc/meminfo")
def test_memory_available_reads_meminfo():
    from dbops.runtime import scratch

    got = scratch.memory_available()
    assert got is not None and 0 < got <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_scratch_cache_setting_decides(monkeypatch):
    from dbops.ops.backup import validate

    monkeypatch.setattr(validate, "copy_stays_cached", lambda size: size < 100)
    assert validate.scratch_cached("keep", 10**12) and not validate.scratch_cached("drop", 1)
    assert validate.scratch_cached("auto", 99) and not validate.scratch_cached("auto", 100)


def _fake_host(tmp_path, cgroup: str, files: dict[str, str], available_kib: int = 20 << 20):
    proc, root = tmp_path / "proc", tmp_path / "cg"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: {available_kib * 2} kB\nMemAvailable: {available_kib} kB\n")
    (proc / "self/cgroup").write_text(cgroup)
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return str(proc), str(root)


def test_memory_available_is_capped_by_a_pods_cgroup_v2_limit(tmp_path):
    """In a container or a pod the page cache its writes dirty is charged to its cgroup: a scratch copy
    stays cached only within the lowest memory.max of its cgroup and its parents."""
    from dbops.runtime import scratch

    proc, root = _fake_host(tmp_path, "0::/kubepods/pod1/c1\n", {
        "cgroup.controllers": "cpu memory", "kubepods/memory.max": "max",
        "kubepods/pod1/memory.max": str(2 << 30), "kubepods/pod1/c1/memory.max": "max"})
    assert scratch.cgroup_memory_limit(proc, root) == 2 << 30
    assert scratch.memory_available(proc, root) == 2 << 30
    proc, root = _fake_host(tmp_path / "b", "0::/\n", {"cgroup.controllers": "memory"})
    assert scratch.cgroup_memory_limit(proc, root) is None
    assert scratch.memory_available(proc, root) == 20 << 30


def test_memory_available_is_capped_by_a_cgroup_v1_limit(tmp_path):
    from dbops.runtime import scratch

    proc, root = _fake_host(tmp_path, "5:cpu:/\n4:memory:/docker/abc\n", {
        "memory/docker/abc/memory.stat": "cache 0\nhierarchical_memory_limit 1073741824\n",
        "memory/docker/abc/memory.limit_in_bytes": "9223372036854771712"})
    assert scratch.memory_available(proc, root) == 1 << 30
    proc, root = _fake_host(tmp_path / "b", "4:memory:/\n", {
        "memory/memory.limit_in_bytes": "9223372036854771712"})  # no limit: the host's figure
    assert scratch.cgroup_memory_limit(proc, root) is None
    assert scratch.memory_available(proc, root) == 20 << 30
    proc, root = _fake_host(tmp_path / "c", "", {})  # nothing known about cgroups
    assert scratch.memory_available(proc, root) == 20 << 30
