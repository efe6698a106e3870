"""Unit checks behind the bad-day messages of `dbops backup` (tests/integration/test_bad_days.py runs them for real)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from dbops.errors import CommandError, ExitCode, PreconditionError, ValidationError
from dbops.runtime import scratch as bk


def test_out_of_space_is_recognised_in_every_form():
    assert bk.out_of_space(OSError(errno.ENOSPC, "No space left on device"))
    assert not bk.out_of_space(OSError(errno.EACCES, "Permission denied"))
    assert bk.out_of_space(CommandError("pg_basebackup exited with status 1", returncode=1,
                                        stderr='could not write to file "x": No space left on device'))
    assert bk.out_of_space(ValidationError("PostgreSQL did not start", detail="PANIC: ... No space left on device"))
    assert not bk.out_of_space(ValidationError("assertion 'rows' did not hold"))
    assert not bk.out_of_space(KeyError("x"))
    # a quota, and the engines' own words (Go prints strerror in lower case)
    assert bk.out_of_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert bk.out_of_space(CommandError("podman run exited with status 126", returncode=126,
                                        stderr="Error: mkdir /var/lib/containers/x: no space left on device"))
    assert bk.out_of_space(ValidationError("PostgreSQL exited", detail="could not extend file: Disk quota exceeded"))


def test_scratch_full_error_names_folder_phase_and_cause(tmp_path: Path):
    e = bk.scratch_full_error(tmp_path, "download", OSError(errno.ENOSPC, "No space left on device"))
    assert e.exit_code == ExitCode.FAILED
    assert str(tmp_path) in e.message and "ENOSPC" in e.message and "during phase download" in e.message
    assert "nothing was stored" in (e.detail or "") and "[Errno 28]" in (e.detail or "")
    assert "backup.scratch_dir" in (e.hint or "")


def test_check_scratch_space_refuses_with_free_and_needed(tmp_path: Path):
    bk.check_scratch_space(tmp_path, 0, owner="postgres")  # a temp folder has room for the margin alone
    with pytest.raises(PreconditionError) as ei:
        bk.check_scratch_space(tmp_path, 2**60, owner="postgres")
    e = ei.value
    assert e.exit_code == ExitCode.PRECONDITION
    assert str(tmp_path) in e.message and "free" in e.message and "needed" in e.message
    assert str(bk.scratch_needed(2**60)) in (e.detail or "")


def test_room_beside_the_copy_keeps_the_copy_the_spool_and_the_limit(tmp_path: Path):
    free = bk.free_bytes(tmp_path)
    room = bk.room_beside_copy(tmp_path, 0, None, 0)
    assert free - bk.scratch_needed(0) - 2**20 <= room <= free - bk.scratch_needed(0)  # the disk moves a little
    assert bk.room_beside_copy(tmp_path, 2**60, None, 0) == 0  # a copy bigger than the disk leaves nothing
    assert bk.room_beside_copy(tmp_path, 0, None, 2**30) <= max(0, room - 2**30 + 2**20)  # the spool is kept
    (tmp_path / "leftover").write_bytes(b"x" * 2**20)  # what the folder holds counts against the limit
    limit = bk.scratch_needed(0) + 8 * 2**20
    assert bk.room_beside_copy(tmp_path, 0, limit, 2**20) == 8 * 2**20 - bk.tree_bytes(tmp_path) - 2**20
    assert bk.room_beside_copy(tmp_path, 0, bk.scratch_needed(0), 0) == 0  # never below nothing


def test_a_server_ending_on_a_nearly_full_disk_is_the_disk_whatever_its_log_says(tmp_path: Path, monkeypatch):
    """The local runtime writes the server's log on the scratch disk: when that disk is full, the line
    naming it may be the one that was lost, and the backup must not be blamed for it."""
    from dbops.ops.backup import replay

    monkeypatch.setattr(replay, "free_bytes", lambda p: 4096)
    with pytest.raises(OSError) as ei:
        replay.raise_if_disk_full(tmp_path)
    assert ei.value.errno == errno.ENOSPC and bk.out_of_space(ei.value) and "4096 bytes free" in str(ei.value)
    monkeypatch.setattr(replay, "free_bytes", lambda p: replay.NEARLY_FULL)
    replay.raise_if_disk_full(tmp_path)  # room left: the server's end is judged by its log, as before

    def gone(p):
        raise FileNotFoundError(p)

    monkeypatch.setattr(replay, "free_bytes", gone)
    replay.raise_if_disk_full(tmp_path)  # the disk cannot be asked: judged by the log
