"""Local manifest copies that a killed dbops left behind are removed by the next command; nothing else is."""

from __future__ import annotations

import os
import subprocess
import sys

from dbops.repo import manifest as mf


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _touch(path) -> str:
    path.write_bytes(b"DBOPSMF5 stale copy")
    return str(path)


def test_copies_of_dead_processes_are_swept_and_nothing_else(tmp_path):
    dead, ns = _dead_pid(), mf._pid_namespace()
    assert ns
    stale = _touch(tmp_path / f"dbops-manifest-p{dead}n{ns}-abc_123")
    alive = _touch(tmp_path / f"dbops-manifest-p{os.getppid()}n{ns}-live")  # its process runs
    mine = _touch(tmp_path / f"dbops-manifest-p{os.getpid()}n{ns}-mine")
    elsewhere = _touch(tmp_path / f"dbops-manifest-p{dead}n{ns + 1}-x")  # another PID namespace: not seen from here
    unnamed = _touch(tmp_path / "dbops-manifest-k2j3h4")  # written before copies were named: not ours to judge
    other = _touch(tmp_path / f"other-p{dead}n{ns}-x")
    (tmp_path / f"dbops-manifest-p{dead}n{ns}-dir").mkdir()
    os.symlink("/etc/hostname", tmp_path / f"dbops-manifest-p{dead}n{ns}-link")

    assert mf.sweep_stale_copies(str(tmp_path)) == [stale]
    assert not os.path.exists(stale)
    for kept in (alive, mine, elsewhere, unnamed, other):
        assert os.path.exists(kept)
    assert (tmp_path / f"dbops-manifest-p{dead}n{ns}-dir").is_dir()
    assert os.path.islink(tmp_path / f"dbops-manifest-p{dead}n{ns}-link")
    assert os.path.exists("/etc/hostname")


def test_a_copy_is_named_by_its_process_and_removed_with_its_manifest(tmp_path):
    path = mf._tmp_file(str(tmp_path))
    assert os.path.basename(path).startswith(f"dbops-manifest-p{os.getpid()}n{mf._pid_namespace()}-")
    assert mf._STALE_NAME.match(os.path.basename(path))
    os.unlink(path)


def test_a_missing_folder_sweeps_nothing(tmp_path):
    assert mf.sweep_stale_copies(str(tmp_path / "absent")) == []
