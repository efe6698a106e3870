"""Bytes of one open file copied into another in the kernel: the one copy loop of the live copy
(:mod:`dbops.ops.backup.livecopy`) and the validation's saved pages (:mod:`dbops.repo.savedpages`)."""

from __future__ import annotations

import errno
import os

# copy_file_range refuses these between some filesystems (or on old kernels): copied through memory then
NO_KERNEL_COPY = (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)
FALLBACK_BYTES = 1 << 20  # the most bytes a copy through memory holds at once


def copy_range(src: int, dst: int, src_at: int, dst_at: int, n: int) -> int:
    """Copy n bytes of src from src_at to dst at dst_at; returns the bytes copied, fewer than n only when
    src ends first (a file that shrank). ``copy_file_range`` where the kernel can; else ``pread`` and
    ``pwrite`` of at most ``FALLBACK_BYTES`` at a time. Positional reads and writes only: neither file's
    offset moves, so several threads may copy into one file at places of their own. A short copy or
    write goes on with the rest."""
    done, kernel = 0, True
    while done < n:
        if kernel:
            try:
                got = os.copy_file_range(src, dst, n - done, src_at + done, dst_at + done)
            except OSError as e:
                if e.errno not in NO_KERNEL_COPY:
                    raise
                kernel = False  # another filesystem the kernel will not copy across
                continue
        else:
            data = os.pread(src, min(n - done, FALLBACK_BYTES), src_at + done)
            got = os.pwrite(dst, data, dst_at + done) if data else 0
        if got == 0:  # the source ends here
            break
        done += got
    return done
