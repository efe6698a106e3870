"""proc.run with a cancel event: stopped (its process group) soon after the event is set, and with
the event never set, every byte of its output, as without one."""

from __future__ import annotations

import threading
import time

import pytest

from dbops import proc


def test_a_cancelled_program_is_stopped_with_its_children(tmp_path):
    pidfile = tmp_path / "pids"
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    t0 = time.monotonic()
    with pytest.raises(proc.Cancelled):  # a shell and the sleep it started: the whole group goes
        proc.run(["sh", "-c", f"sleep 60 & echo $$ $! > {pidfile}; wait"], timeout=120, cancel=cancel)
    assert time.monotonic() - t0 < 10
    for pid in map(int, pidfile.read_text().split()):
        assert not _running(pid), pid


def _running(pid: int) -> bool:
    """Whether pid still runs (a zombie, ended and waiting to be reaped, does not)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        if state == "Z":
            return False
        time.sleep(0.05)
    return True


def test_without_the_event_set_no_output_is_lost_and_the_timeout_holds():
    big = 5 * 2**20  # more than a pipe holds: read across several looks at the event
    r = proc.run(["sh", "-c", f"head -c {big} /dev/zero | tr '\\0' x; sleep 0.5; echo end >&2"],
                 cancel=threading.Event(), timeout=60)
    assert r.returncode == 0 and r.stdout == "x" * big and r.stderr.strip() == "end"
    r = proc.run(["cat"], input="fed once\n", cancel=threading.Event(), timeout=60)
    assert r.stdout == "fed once\n"
    t0 = time.monotonic()
    with pytest.raises(proc.CommandError, match="did not finish within 1 s"):
        proc.run(["sleep", "30"], timeout=1, cancel=threading.Event())
    assert time.monotonic() - t0 < 10
