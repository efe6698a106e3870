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
