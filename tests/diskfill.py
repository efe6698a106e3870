"""Filling a filesystem to its last byte, as another process writing to the same disk would."""

from __future__ import annotations

import errno
import os
from pathlib import Path


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
