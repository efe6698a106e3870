"""A throwaway instance's replay, as validation waits for it (see :mod:`dbops.ops.backup.validate`).

``wait_paused``: one connection stays open and asks for replay's state every ``PAUSE_POLL``
seconds; whether the server still runs is asked of the runtime (for a container: the engine, a
process of its own, 0.05 s on the serial path) only when a query fails: a server that answers
runs. A full scratch disk is looked for in the log.

``restartpoint_beside``: once paused, a ``CHECKPOINT`` (in recovery: a restart point at the last
replayed checkpoint record, the one the target capture wrote) writes the pages replay dirtied
while the checks run, instead of at the shutdown."""

from __future__ import annotations

import errno
import logging
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dbops import log
from dbops.errors import PostgresError, ValidationError
from dbops.ops.backup.environment import environment_cause, environment_error, server_detail
from dbops.ops.backup.target import Target
from dbops.pg import conn as pgconn
from dbops.pg.lsn import format_lsn, parse_lsn
from dbops.runtime.scratch import NO_SPACE, disk_full_lines, free_bytes

_log = log.get("backup")


LOG_CHECK_INTERVAL = 2.0
# Connections fail with this when the relcache init file cannot be written; with the disk (nearly)
# full that is ENOSPC too, though the log line does not say so.
INIT_FILE_FAILED = "could not write init file"
NEARLY_FULL = 16 * 2**20  # less than a WAL segment: recovery cannot go on


def fail_on_full_disk(inst, data: Path) -> None:
    """A full scratch disk makes recovery wait for ever (restore_command cannot copy a segment, every
    connection fails): raise ENOSPC at once instead of waiting for the start timeout."""
    text = inst.logs(200)
    hits = disk_full_lines(text)  # a full /dev/shm is not the disk: the environment's (runtime.shm_size)
    if not hits and free_bytes(data) < NEARLY_FULL:
        hits = [line for line in text.splitlines() if INIT_FILE_FAILED in line]
    if hits:
        raise OSError(errno.ENOSPC, f"PostgreSQL on the restored copy ran out of disk space: {hits[-1].strip()}")


def raise_if_disk_full(data: Path) -> None:
    """A server that ended with the copy's disk (nearly) full ended because of the disk, not the backup,
    whatever its log says: where the log is written on that disk (the local runtime), the line
    that names the full disk may be the one that could not be written. Raises ENOSPC then."""
    try:
        free = free_bytes(data)
    except OSError:
        return
    if free < NEARLY_FULL:
        raise OSError(errno.ENOSPC, f"PostgreSQL on the restored copy ended with {free} bytes free on its disk "
                                    f"({NO_SPACE})")


PAUSE_POLL = 0.05  # how often replay's progress is asked (on one open connection: a query, no new session)


def wait_paused(inst, data: Path, target: Target, timeout: float) -> tuple[int, float | None]:
    """Wait until replay paused at the target; return (replayed LSN, last replayed commit time)."""
    deadline = time.monotonic() + timeout
    node = inst.node()
    last_err: str | None = None
    next_log_check = time.monotonic() + LOG_CHECK_INTERVAL
    conn = None
    try:
        while time.monotonic() < deadline:
            now = time.monotonic()
            if now > next_log_check:
                fail_on_full_disk(inst, data)
                next_log_check = now + LOG_CHECK_INTERVAL
            if conn is None and last_err is not None:  # the last query failed: is it still there?
                if not inst.is_running():
                    logs = server_detail(inst)
                    cause = environment_cause(logs)
                    if cause:
                        raise environment_error("PostgreSQL stopped during recovery", cause, logs)
                    raise_if_disk_full(data)
                    raise ValidationError("PostgreSQL stopped during recovery before reaching the target",
                                          detail=logs)
            try:
                if conn is None:
                    conn = pgconn.connect(node)
                row = conn.execute("SELECT pg_get_wal_replay_pause_state(), pg_last_wal_replay_lsn()::text, "
                                   "extract(epoch from pg_last_xact_replay_timestamp())::float8, "
                                   "pg_is_in_recovery()").fetchone()
                state, replayed, commit_ts, in_rec = row
                if not in_rec:
                    raise ValidationError("the throwaway instance left recovery instead of pausing at the target")
                if state == "paused" and replayed and parse_lsn(replayed) >= target.lsn:
                    return parse_lsn(replayed), commit_ts
            except PostgresError as e:
                last_err = e.detail or e.message
                if conn is not None:
                    conn.close()
                    conn = None
            time.sleep(PAUSE_POLL)
    finally:
        if conn is not None:
            conn.close()
    # every segment replay needs was fetched and verified before the start: a slow replay is the machine's
    raise environment_error(f"replay did not reach the target {format_lsn(target.lsn)} within {timeout:.0f} s",
                            "backup.validation.start_timeout too short for this machine",
                            (last_err + "\n" if last_err else "") + inst.logs(30))


class Restartpoint:
    """What :func:`restartpoint_beside` found once its block ended: ``written`` when its CHECKPOINT
    came back and the server logged the restart point it asked for as run (not skipped)."""

    def __init__(self) -> None:
        self.returned = False
        self.written = False
        self.log: str | None = None  # the server log's end, read as soon as the CHECKPOINT came back


# Logged when a restart point asked for by CHECKPOINT (flags immediate and wait; in recovery not force,
# maybe with a pending cause) really runs; a skipped one ("already performed") logs nothing at the
# default level. log_checkpoints is on in the throwaway. Only the CHECKPOINT asks with these flags.
# (PostgreSQL 18 renamed the immediate flag "fast".)
ASKED_RESTARTPOINT = re.compile(r"restartpoint starting: (?:immediate|fast)( force)? wait\b")


@contextmanager
def restartpoint_beside(inst, timeout: float) -> Iterator[Restartpoint]:
    """Run ``CHECKPOINT`` on its own connection while the block runs (the checks), and wait for it.

    Paused at the target, replay changes nothing more and a server in recovery does not dirty a page
    for its hint bits (``wal_log_hints``), so the restart point writes every page the stop would
    have written. The shutdown then finds the restart point made ("skipping restartpoint, already
    performed") and only records "shut down in recovery" with the replayed point as its minimum
    recovery point: the same stopped folder, without up to shared_buffers of writes on the serial
    path (0.33-0.5 s at scale 400, measured). When the last replayed checkpoint is the one the copy
    started from (a backup replayed to its own consistent point), there is nothing to restart from:
    the command does nothing, as the shutdown would. A failure only costs the overlap: the
    shutdown's own restart point writes the pages then. The wait after the block is bounded by
    ``timeout`` (the validation's start_timeout): a restart point still running then (a stalled
    scratch disk) is left to the shutdown, which waits for it and never skips its own, so the run
    goes on to the stop and the throwaway's removal instead of hanging before them.

    Yields a :class:`Restartpoint`, filled in when the block ends: whether the restart point ran and
    was written (every page replay left dirty written, with its checksum computed, before the stop:
    see :mod:`dbops.ops.backup.shadow`). The log is read for that in the CHECKPOINT's thread as soon as
    the command came back (a container's log is an engine call: beside the checks, not after them);
    when the line is not in it yet, it is read again once the block ended."""
    rp = Restartpoint()

    def run() -> None:
        try:
            with pgconn.session(inst.node()) as c:
                c.execute("CHECKPOINT")
            rp.returned = True
        except PostgresError as e:
            log.event(_log, logging.WARNING, "CHECKPOINT beside the checks failed; the stop writes the pages",
                      error=e.detail or e.message)
            return
        try:
            rp.log = inst.logs(400)
        except Exception:  # noqa: BLE001  read again once the block ended
            rp.log = None

    t = threading.Thread(target=run, name="dbops-restartpoint", daemon=True)
    t.start()
    try:
        yield rp
    finally:
        t.join(timeout)
        if t.is_alive():
            log.event(_log, logging.WARNING, "CHECKPOINT beside the checks still running; the stop waits for it",
                      seconds=timeout)
        elif rp.returned:
            try:
                rp.written = rp.log is not None and ASKED_RESTARTPOINT.search(rp.log) is not None
                if not rp.written:  # not logged yet when the thread read it (or not read): the log as it is now
                    rp.written = ASKED_RESTARTPOINT.search(inst.logs(400)) is not None
                if not rp.written:
                    log.event(_log, logging.INFO, "no restart point logged beside the checks (none due, or "
                              "not found in the log's last 400 lines): pg_checksums reads every file")
            except Exception as e:  # noqa: BLE001  unknown: pg_checksums then reads every file
                log.event(_log, logging.WARNING, "could not read the throwaway's log", error=str(e))
