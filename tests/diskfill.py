"""Small filesystems, and filling one to its last byte as another process writing to the same disk would."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dbops import proc

# on a test that mounts one: only root may (as the suite runs in CI)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (as the suite runs in CI)")


@contextmanager
def tmpfs(path: Path, size: int, inodes: int | None = None) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes (and ``inodes`` entries, its root folder counted, when given) mounted
    at path (made when missing), unmounted after the block."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size},mode=0755" + (f",nr_inodes={inodes}" if inodes else "")
    proc.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], user=None, timeout=30)
    try:
        yield path
    finally:
        proc.run(["umount", "-l", str(path)], user=None, timeout=30, check=False)


def fill_up(ballast: Path) -> None:
    """Append to ``ballast`` until the filesystem refuses even 512 bytes more (ENOSPC)."""
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for block in (1 << 20, 4096, 512):
            try:
                while True:
                    os.write(fd, b"\0" * block)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
