"""Issue #13 item 6: which validation failures blame the environment (exit 17, backup kept usable)."""

from __future__ import annotations

import pytest

from dbops.errors import ExitCode, ValidationEnvironmentError, ValidationError
from dbops.ops.backup.environment import environment_cause, environment_error


@pytest.mark.parametrize("line", [
    "2026-11-29 21:30:01 UTC [55] LOG:  startup process (PID 57) was terminated by signal 9: Killed",
    "FATAL:  out of memory\nDETAIL:  Failed on request of size 8192.",
    "FATAL:  could not map anonymous shared memory: Cannot allocate memory",
    "connection failed: FATAL:  sorry, too many clients already",
    "FATAL:  remaining connection slots are reserved for non-replication superuser connections",
    "LOG:  could not fork new process for connection: Resource temporarily unavailable",
    "the container dbops-backup-1 was killed by the OOM killer (its memory limit): its main process was terminated "
    "by signal 9",
    "the container dbops-backup-1 ended with status 137: its main process was terminated by signal 9",
])
def test_environment_failures_are_recognised(line):
    assert environment_cause(line)


@pytest.mark.parametrize("line", [
    "PANIC:  could not locate a valid checkpoint record",
    "FATAL:  invalid checkpoint record",
    "WARNING:  page verification failed, calculated checksum 1234 but expected 4321",
    "ERROR:  invalid page in block 7 of relation base/5/16384",
    "",
])
def test_content_faults_are_not_blamed_on_the_environment(line):
    assert environment_cause(line) is None


def test_an_environment_error_has_its_own_exit_code_and_is_no_validation_error():
    e = environment_error("PostgreSQL exited while starting", "out of memory", "FATAL:  out of memory")
    assert isinstance(e, ValidationEnvironmentError) and not isinstance(e, ValidationError)
    assert e.exit_code == ExitCode.VALIDATION_ENVIRONMENT == 17
    assert "says nothing against the backup" in e.hint


SHM_FULL = ('could not resize shared memory segment "/PostgreSQL.3981538810" to 33554432 bytes: '
            'No space left on device')


def test_a_full_dev_shm_is_the_environment_not_the_scratch_disk():
    """Seen at 1,000,000 tables: PostgreSQL 15's statistics outgrew the container's 64 MB /dev/shm.
    It was reported as the scratch folder running out of space (exit 1); it is exit 17 naming
    runtime.shm_size, and a real full disk is still the scratch folder's."""
    from dbops.errors import ValidationError
    from dbops.runtime.scratch import out_of_space

    cause = environment_cause(SHM_FULL)
    assert cause and "runtime.shm_size" in cause
    err = environment_error("database postgres of the restored backup could not be read", cause, SHM_FULL)
    assert int(err.exit_code) == 17 and not out_of_space(err)
    assert not out_of_space(ValidationError("database postgres of the restored backup cannot be read", detail=SHM_FULL))
    disk = 'could not extend file "base/5/16384": No space left on device'
    assert out_of_space(ValidationError("replay failed", detail=disk)) and environment_cause(disk) is None


def test_a_full_lock_table_is_the_environment():
    from dbops.ops.backup.checks import LOCK_BUDGET, _batches

    assert "max_locks_per_transaction" in environment_cause("ERROR:  out of shared memory\nHINT:  You might need "
                                                            "to increase max_locks_per_transaction.")
    tables = [("a", None, 101)] * 30 + [("b", None, 1)] * 450 + [("c", None, 5000)]
    parts = list(_batches(tables))
    assert [t for p in parts for t in p] == tables  # every table read, in order
    assert all(len(p) <= 200 and (sum(t[2] for t in p) <= LOCK_BUDGET or len(p) == 1) for p in parts)
