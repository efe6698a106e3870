"""The scratch copy's early write-back (runtime.writeback.flush_behind): a thread that syncs the
folder's filesystem and ends; a failure is logged, never raised (nothing waits for it)."""

from __future__ import annotations

import logging
import os
import threading

from dbops.runtime import writeback


def test_flush_behind_writes_back_in_a_thread_and_says_so(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dbops")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "16384").write_bytes(os.urandom(1 << 20))
    t = writeback.flush_behind(tmp_path / "data")
    assert t.name == "dbops-writeback" and t.daemon
    t.join(60)
    assert not t.is_alive()
    assert any(r.getMessage() == "scratch copy written back" for r in caplog.records)
    assert (tmp_path / "data" / "16384").stat().st_size == 1 << 20  # changes no file


def test_flush_behind_failure_is_logged_not_raised(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dbops")
    raised: list[BaseException] = []
    before = threading.excepthook
    threading.excepthook = lambda args: raised.append(args.exc_value)
    try:
        t = writeback.flush_behind(tmp_path / "gone")  # no such folder: open() fails
        t.join(60)
    finally:
        threading.excepthook = before
    assert not raised
    assert any(r.getMessage() == "early write-back of the scratch copy failed" for r in caplog.records)
