"""Why a restored server stopped during recovery, as the error the user can act on: a full disk is
named as such, before the reading of 'recovery ended before the target' (a restore_command whose
copy failed looks to PostgreSQL like a segment not in the archive)."""

from __future__ import annotations

from types import SimpleNamespace

from dbops.errors import ExitCode, TargetError
from dbops.ops.restore.recover import _explain
from dbops.runtime.scratch import out_of_space

CP_FAILED = """\
2026-12-03 09:10:01.000 UTC [9] LOG:  redo starts at 0/7000028
cp: error writing 'pg_wal/RECOVERYXLOG': No space left on device
2026-12-03 09:10:01.100 UTC [9] LOG:  redo done at 0/8000060 system usage: CPU: user: 0.01 s
2026-12-03 09:10:01.100 UTC [9] FATAL:  recovery ended before configured recovery target was reached
2026-12-03 09:10:01.200 UTC [6] LOG:  startup process (PID 9) exited with exit code 1
"""

PLAN = SimpleNamespace(archive_end={"segment": "000000010000000000000009", "lsn": "0/9000000"}, holes=[],
                       target=SimpleNamespace(describe=lambda: "time 2026-12-03 09:09:00+00"),
                       backup=SimpleNamespace(backup_id="20261203T090000Z-abc"))


def test_a_full_disk_during_recovery_is_named_not_taken_for_the_archive_end():
    e = _explain(CP_FAILED, PLAN)
    assert e.exit_code == ExitCode.FAILED and not isinstance(e, TargetError)
    assert "ran out of disk space (ENOSPC: No space left on device) while recovering" in e.message
    assert "cp: error writing 'pg_wal/RECOVERYXLOG'" in (e.detail or "")
    assert out_of_space(e)  # so the restore names its folders and their free space (ops.restore.run)


def test_the_archive_end_is_still_the_archive_end():
    e = _explain(CP_FAILED.replace("No space left on device", "Input/output error"), PLAN)
    assert isinstance(e, TargetError) and "the archive ends at 000000010000000000000009" in e.message


def test_a_full_dev_shm_is_not_a_full_disk():
    shm = ('FATAL:  could not resize shared memory segment "/PostgreSQL.1" to 1048576 bytes: No space left on device\n'
           "LOG:  startup process (PID 9) exited with exit code 1\n")
    e = _explain(shm, PLAN)
    assert "disk space" not in e.message
