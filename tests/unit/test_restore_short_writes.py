"""A restore's writes: a short write (a disk filling up, a signal) goes on with the rest, and a disk
that is full then fails with ENOSPC (which the backup and restore report as a full disk), never
as an internal error."""

from __future__ import annotations

import errno
import os
import resource
import signal

from dbops.repo import rangewrite as rmod


def test_short_writes_go_on_with_the_rest(tmp_path, monkeypatch):
    real = os.pwritev
    calls = []

    def short(fd, bufs, offset):  # at most 5,000 bytes a call, as a filling disk may give
        calls.append(offset)
        flat = b"".join(bytes(b) for b in bufs)[:5000]
        return real(fd, [flat], offset)

    monkeypatch.setattr(rmod.os, "pwritev", short)
    pieces = [memoryview(bytes([i]) * 3000) for i in range(1, 8)]
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        rmod.write_pieces(fd, pieces, 100)
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == bytes(100) + b"".join(bytes(p) for p in pieces)
    assert len(calls) == 5  # 21,000 bytes, 5,000 a call


def test_a_write_past_what_the_disk_takes_fails_with_its_cause(tmp_path):
    """RLIMIT_FSIZE makes the kernel write part of a buffer, then refuse the rest (EFBIG), as a
    filling disk does (ENOSPC): the error carries the errno, not a bare 'short write'."""
    pid = os.fork()
    if pid == 0:  # in a child: the limit and the signal stay there
        code = 1
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))
            fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                rmod.write_pieces(fd, [memoryview(b"x" * 8192), memoryview(b"y" * 8192)], 0)
            except OSError as e:
                code = 0 if e.errno == errno.EFBIG else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert (tmp_path / "f").stat().st_size == 10_000  # the part the limit allowed, written


