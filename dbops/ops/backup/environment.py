"""Telling a bad backup from a bad environment when validation fails.

Only a fault in the backup's own content marks it ``failed`` (and lets the next prune delete
it): a hash mismatch, a missing object, WAL missing from the archive, a server that reports
its data inconsistent or corrupt, failed checks. The environment failing while it proves the
backup says nothing about the backup: the throwaway server not ready within the start timeout,
killed by the OOM killer, out of connection slots or shared memory, the container runtime
failing. Those raise :class:`~dbops.errors.ValidationEnvironmentError` (exit 17) and the backup
keeps its status. (A full scratch disk has its own error: see dbops.runtime.scratch.)
"""

from __future__ import annotations

import re

from dbops.errors import ValidationEnvironmentError
from dbops.runtime.scratch import SHARED_MEMORY_FULL

# Server log / libpq lines that blame the machine, not the data (PostgreSQL's own wording).
_ENVIRONMENT = [
    # PostgreSQL 15's statistics (an entry per table read) and parallel queries take dynamic shared
    # memory from /dev/shm: a container's is runtime.shm_size. "No space left on device" here is
    # that tmpfs, not the scratch disk.
    (SHARED_MEMORY_FULL, "the throwaway server's /dev/shm is full: raise runtime.shm_size"),
    (re.compile(r"killed by the OOM killer", re.I), "killed by the OOM killer: the memory limit is too low"),
    (re.compile(r"terminated by signal 9|was terminated by signal 9: Killed", re.I), "a server process was killed "
                                                                                   "(signal 9: the OOM killer?)"),
    (re.compile(r"out of memory|could not fork|Cannot allocate memory", re.I), "out of memory"),
    (re.compile(r"could not (map anonymous|create) shared memory|could not create semaphores", re.I),
     "no shared memory for the server"),
    (re.compile(r"out of shared memory", re.I), "the server's lock table is full (max_locks_per_transaction)"),
    (re.compile(r"too many connections|remaining connection slots are reserved|sorry, too many clients", re.I),
     "no connection slot free"),
    (re.compile(r"could not create lock file|could not bind|Address already in use", re.I),
     "the server could not claim its socket"),
    (re.compile(r"Resource temporarily unavailable|Too many open files", re.I), "an operating-system limit"),
]


def environment_cause(text: str | None) -> str | None:
    """Why the environment (not the backup) failed, judging by a server log or error text; else None."""
    for pattern, cause in _ENVIRONMENT:
        if text and pattern.search(text):
            return cause
    return None


_KILLED = re.compile(r"terminated by signal 9|killed by the OOM killer", re.I)


def server_detail(inst, tail: int = 30) -> str:
    """The server log's tail, and how the host ended the server when it did (the OOM killer kills the
    postmaster too, and then nothing in the log says so)."""
    ended = inst.ended_by()
    return inst.logs(tail) + (f"\n{ended}" if ended else "")


def killed_cause(inst) -> str | None:
    """A check failed: was it because the host killed the server or one of its processes (OOM)?"""
    text = server_detail(inst, 50)
    return environment_cause(text) if _KILLED.search(text) else None


def environment_error(what: str, cause: str, detail: str | None) -> ValidationEnvironmentError:
    return ValidationEnvironmentError(
        f"validation could not run: {what} ({cause})", detail=detail,
        hint="this says nothing against the backup, which keeps its status; fix the cause (memory, "
             "backup.validation.start_timeout, max_connections, the container engine) and run again")


def ended_cause(returncode: int, tool: str) -> str:
    """Why a tool (pg_checksums exits 0 or 1 on its own, pg_amcheck 0, 1 or 2) ended with another
    status: killed by a signal (directly: negative; in a container: 128 + N, 137 the OOM killer's
    SIGKILL), or its container engine unable to run it (125-127, as podman and docker report their
    own failures)."""
    if returncode < 0:
        return f"{tool} was terminated by signal {-returncode}" + (" (the OOM killer?)" if returncode == -9 else "")
    if returncode in (125, 126, 127):
        return f"the container engine could not run {tool} (status {returncode})"
    if returncode > 128:
        return f"{tool} was terminated by signal {returncode - 128}" + (
            " (the OOM killer?)" if returncode == 137 else "")
    return f"{tool} ended with status {returncode}, which it never exits with on its own"
