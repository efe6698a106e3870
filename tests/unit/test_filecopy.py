"""The one kernel copy loop (dbops.filecopy.copy_range) behind the live copy and the saved pages: in the
kernel on one filesystem, through memory across filesystems the kernel will not copy between (tmpfs to
the test's folder: a real EXDEV), and short only where the source ends."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from dbops import filecopy
from dbops.filecopy import copy_range

DATA = bytes(range(256)) * (3 * 4096 + 17)  # a little over 3 MiB: several fallback steps


def _fds(src: Path, dst: Path) -> tuple[int, int]:
    src.write_bytes(DATA)
    dst.write_bytes(b"\xee" * 64)
    return os.open(src, os.O_RDONLY), os.open(dst, os.O_RDWR)


def _copy_and_check(src: Path, dst: Path) -> None:
    fin, fout = _fds(src, dst)
    try:
        assert copy_range(fin, fout, 1000, 64, len(DATA) - 1000) == len(DATA) - 1000
        assert copy_range(fin, fout, 0, len(DATA) + 64, 10) == 10
        assert os.lseek(fin, 0, os.SEEK_CUR) == 0 and os.lseek(fout, 0, os.SEEK_CUR) == 0  # positional only
        # the source ends first: what there is, and no error
        assert copy_range(fin, fout, len(DATA) - 5, 0, 100) == 5
    finally:
        os.close(fin)
        os.close(fout)
    got = dst.read_bytes()
    assert got[:5] == DATA[-5:] and got[5:64] == b"\xee" * 59
    assert got[64:64 + len(DATA) - 1000] == DATA[1000:]
    assert got[len(DATA) + 64:] == DATA[:10]


def test_copy_in_the_kernel_on_one_filesystem(tmp_path):
    _copy_and_check(tmp_path / "a", tmp_path / "b")


def test_copy_across_filesystems_goes_through_memory(tmp_path):
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:  # tmpfs: the kernel will not copy it to ext4
        src = Path(shm) / "a"
        assert os.stat(shm).st_dev != os.stat(tmp_path).st_dev
        src.write_bytes(b"x")
        fin, fout = os.open(src, os.O_RDONLY), os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT)
        try:
            os.copy_file_range(fin, fout, 1, 0, 0)
        except OSError as e:
            assert e.errno in filecopy.NO_KERNEL_COPY  # so the copy below goes through memory
        else:  # kernels 5.3-5.18 copy across filesystems: nothing to prove about the fallback here
            pytest.skip("this kernel copies across filesystems in copy_file_range")
        finally:
            os.close(fin)
            os.close(fout)
        _copy_and_check(src, tmp_path / "b")
