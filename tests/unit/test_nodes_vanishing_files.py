"""A file of the data folder removed between the controller's test and its read.

An exiting postmaster removes its postmaster.pid at any moment; `dbops failover` fences the old primary
while it may still be exiting. These tests put a ``cat`` first on PATH that removes the file it is
asked for just before reading it: the narrowest form of that race, every time.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from dbops.config.model import Node
from dbops.errors import DbopsError
from dbops.nodes.local import LocalController

PID_FILE = "12345\n/data\n1764000000\n5432\n"


@pytest.fixture
def ctl(pg_owned_dir) -> LocalController:
    """A controller on a data folder owned by postgres (by this user when not root), so that a file of
    root's, mode 0, is one its commands cannot read."""
    box, _ = pg_owned_dir
    data = box / "data"
    data.mkdir(mode=0o700)
    st = box.stat()
    os.chown(data, st.st_uid, st.st_gid)
    return LocalController(Node(name="pg1", data_dir=str(data), os_user=pwd.getpwuid(st.st_uid).pw_name))


def _put(path: Path, text: str) -> None:
    """A file of the data folder, owned like it."""
    path.write_text(text)
    st = path.parent.stat()
    os.chown(path, st.st_uid, st.st_gid)


@pytest.fixture
def racing_cat(pg_owned_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    """`cat FILE` removes FILE first (a postmaster exiting at the worst moment); `cat` alone is the real one."""
    real = next(p for p in ("/usr/bin/cat", "/bin/cat") if os.path.exists(p))
    shim = pg_owned_dir[0] / "shim"
    shim.mkdir(mode=0o755)
    (shim / "cat").write_text(f'#!/bin/sh\nfor a in "$@"; do rm -f "$a"; done\nexec {real} "$@"\n')
    (shim / "cat").chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim}:{os.environ['PATH']}")


def test_fencing_an_exiting_primary_whose_pid_file_vanishes(ctl: LocalController, racing_cat: None) -> None:
    data = Path(ctl.data_dir)
    _put(data / "postmaster.pid", PID_FILE)
    _put(data / "postgresql.auto.conf", "port = 5432\n")
    fence = ctl.fence_as_standby("host=10.0.0.2 port=5432", None)
    assert fence.postmaster is None  # gone: no postmaster to compare against a later one
    assert fence.saved_auto_conf is None  # read with the same racing cat: removed, so read as absent
    assert (data / "standby.signal").exists()
    assert "primary_conninfo = 'host=10.0.0.2 port=5432'" in (data / "postgresql.auto.conf").read_text()


def test_fencing_reports_the_pid_file_of_a_postmaster_still_there(ctl: LocalController) -> None:
    data = Path(ctl.data_dir)
    _put(data / "postmaster.pid", PID_FILE)
    fence = ctl.fence_as_standby("host=10.0.0.2", None)
    assert fence.postmaster == "pid 12345, started 1764000000"


def _unreadable(path: Path) -> None:
    """A file the data folder's owner cannot read (root's, mode 0; or the owner's own, mode 0, when not root)."""
    path.write_text(PID_FILE)
    path.chmod(0)
    if os.geteuid() != 0:
        return
    os.chown(path, 0, 0)


def test_a_pid_file_that_cannot_be_read_still_fails_the_fence(ctl: LocalController) -> None:
    data = Path(ctl.data_dir)
    _put(data / "postgresql.auto.conf", "port = 5432\n")
    _unreadable(data / "postmaster.pid")
    with pytest.raises(DbopsError, match="fence pg1 as a standby") as e:
        ctl.fence_as_standby("host=10.0.0.2", None)
    assert "Permission denied" in str(e.value.detail or "") + str(e.value), e.value
    # half done: the configuration is put back, the signal stays (a start comes up in recovery)
    assert (data / "postgresql.auto.conf").read_text() == "port = 5432\n"
    assert (data / "standby.signal").exists()


def test_reading_a_file_removed_under_the_read_is_reading_no_file(ctl: LocalController, racing_cat: None) -> None:
    _put(Path(ctl.data_dir) / "postmaster.pid", PID_FILE)
    assert ctl.read_file("postmaster.pid") is None
    assert ctl.postmaster() is None


def test_reading_keeps_a_real_error_and_content(ctl: LocalController) -> None:
    data = Path(ctl.data_dir)
    _put(data / "PG_VERSION", "15\n")
    assert ctl.read_file("PG_VERSION") == "15\n"
    assert ctl.read_file("missing") is None
    _unreadable(data / "postmaster.pid")
    with pytest.raises(DbopsError, match="cannot read postmaster.pid") as e:
        ctl.read_file("postmaster.pid")  # there but unreadable: an error, not "absent"
    assert "Permission denied" in str(e.value.detail or "") + str(e.value), e.value
