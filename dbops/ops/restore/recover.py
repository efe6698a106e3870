"""Run the recovery of a restored folder and leave it in the state asked for.

A local PostgreSQL (the folder owner's OS user, the binaries of the backup's major version)
starts on the folder with the folder's own configuration plus, for this run only: a free
loopback port, no Unix socket, a generated ``pg_hba.conf`` admitting dbops on loopback,
``restore_command`` serving the WAL fetched ahead with a plain copy (anything else through
``dbops wal-fetch``) and ``recovery_target_action = pause``. dbops waits until replay pauses
at the target and reads what it reached, then promotes it (``--promote``) or leaves it in
recovery (``--pause``, ``--shutdown``), stops it cleanly, rewrites the folder's settings for
that final state and, with ``--start``, starts the server for the user with ``pg_ctl``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from dbops import log, proc
from dbops.config import Config
from dbops.errors import DbopsError, PostgresError, TargetError, ValidationError
from dbops.ops.restore import conf as rconf
from dbops.ops.restore import wal as rwal
from dbops.ops.restore.target import iso_utc
from dbops.pg import binaries, controldata
from dbops.pg import conn as pgconn
from dbops.pg.lsn import format_lsn, parse_lsn
from dbops.runtime import InstanceSpec, LocalRuntime
from dbops.runtime.scratch import NO_SPACE, disk_full_lines
from dbops.runtime.walfolder import link_wal, release_links

if TYPE_CHECKING:
    from dbops.phases import Phases
    from dbops.ops.restore.plan import Options, Plan

_log = log.get("restore")

FINAL_STATE = {"promote": "promoted", "pause": "paused at the target", "shutdown": "shut down at the target"}


def bin_dir(cfg: Config, pg_version: str) -> str:
    """PostgreSQL binaries of the backup's major version on this host."""
    configured = cfg.runtime.bin_dir if cfg.runtime.engine == "none" else None
    major = int(pg_version.split(".")[0]) if pg_version.split(".")[0].isdigit() else None
    return binaries.bindir(configured, major)


def instance_settings(cfg: Config, plan: "Plan", opts: "Options", cache: Path,
                      linked: bool = False) -> dict[str, str]:
    """The folder's settings, adjusted for dbops' own run: pause at the target, WAL from the cache first
    (``linked``: read in place where the cache's file is linked into pg_wal)."""
    s = {k: v for k, v in plan.settings.items() if k != "port"}
    s["restore_command"] = rconf.run_command(cache, cfg, linked)
    s["recovery_target_action"] = "pause"
    s["hot_standby"] = "on"
    s["archive_mode"] = "on" if opts.keep_archiving else "off"
    return s


def run(cfg: Config, plan: "Plan", opts: "Options", cache: Path, phases: "Phases", pg_version: str,
        check_wal: Callable[[], None], *, mounts: tuple[tuple[str, str], ...] = (),
        relink: dict[int, Path] | None = None) -> tuple[dict[str, Any], str, dict[str, Any] | None]:
    """(what was reached, the final state, where it runs with --start). check_wal raises when fetching
    the WAL ahead failed (a damaged segment): that error, not the server's view of it, is reported.
    ``mounts``: (folder, recorded location) of tablespaces created during replay, mapped elsewhere: the
    server sees the folder there; ``relink``: their links, pointed at their folders once it stopped."""
    data = Path(plan.target_dir)
    bins = bin_dir(cfg, pg_version)
    rt = LocalRuntime(bin_dir=bins, db_user=cfg.runtime.user)
    timeout = cfg.backup.validation.start_timeout
    run_dir = cache.parent / "run"
    # Promoted, the server only needs the WAL up to the target: read it where it was fetched to.
    # Not while it archives (--keep-archiving): that run keeps the copy path it always had (link_wal
    # now marks each linked file .done, as restored files are, but linking is not used or tested there).
    linked = opts.final == "promote" and not opts.keep_archiving and link_wal(cache, data)
    spec = InstanceSpec(data_dir=data, port=proc.free_port(),
                        settings=instance_settings(cfg, plan, opts, cache, linked),
                        name=f"restore-{data.name}", run_dir=run_dir, mounts=mounts)
    with phases("start"):
        inst = rt.start(spec)
    with inst:
        with phases("start"):
            try:
                inst.wait_ready(timeout)
            except PostgresError:
                check_wal()
                raise _explain(inst.logs(80), plan) from None
        with phases("replay"):
            reached = _wait_paused(inst, plan, timeout, check_wal)
        reached["wal_read_in_place"] = linked
        if opts.final == "promote":
            with phases("promote"):
                if linked:  # what the promoted server writes into must be its own file alone
                    reached["wal_released"] = release_links(cache, data)
                    release_links(cache / rconf.STAGED_DIR, data)  # the same files' names before release
                reached["promoted_timeline"] = _promote(inst, timeout)
        with phases("stop"):
            inst.stop("fast", timeout=timeout)
    for oid, folder in (relink or {}).items():
        link = data / "pg_tblspc" / str(oid)
        if link.is_symlink() and os.readlink(link) != str(folder):
            link.unlink()
            os.symlink(str(folder), link)
    cd = controldata.read(str(data), bin_dir=bins)
    expected = "shut down" if opts.final == "promote" else "shut down in recovery"
    if cd.state != expected:
        raise PostgresError(f"the restored server did not stop cleanly (state {cd.state!r}, expected {expected!r})")
    _finalize_settings(data, plan, reached)
    running = None
    if opts.start:
        with phases("start_final"):
            running = start_server(data, bins, opts.port, timeout)
    log.event(_log, logging.INFO, "restore reached its target", lsn=reached["lsn"],
              last_commit=reached["last_commit_time"], timeline=reached["timeline"], final=opts.final)
    return reached, FINAL_STATE[opts.final], running


PAUSE_POLL = 0.05  # how often replay's state is asked, on one open connection (a query, not a new session)


def _wait_paused(inst, plan: "Plan", stall_timeout: float, check_wal: Callable[[], None]) -> dict[str, Any]:
    """Wait until replay pauses at the target (progress must not stall); what it reached."""
    last_lsn, last_move = None, time.monotonic()
    try:
        conn = pgconn.connect(inst.node())
    except PostgresError:
        check_wal()
        if not inst.is_running():
            raise _explain(inst.logs(80), plan) from None
        raise
    with conn as c:
        while True:
            check_wal()
            if not inst.is_running():
                check_wal()
                raise _explain(inst.logs(80), plan)
            try:
                state, replayed, commit_ts, in_rec = c.execute(
                    "SELECT pg_get_wal_replay_pause_state(), pg_last_wal_replay_lsn()::text, "
                    "extract(epoch from pg_last_xact_replay_timestamp())::float8, pg_is_in_recovery()").fetchone()
            except PostgresError:
                if not inst.is_running():
                    check_wal()
                    raise _explain(inst.logs(80), plan) from None
                raise
            if not in_rec:
                raise PostgresError("the restored server left recovery instead of pausing at the target",
                                    detail=inst.logs(30))
            if state == "paused":
                lsn = parse_lsn(replayed)
                return {"lsn": format_lsn(lsn), "last_commit_time": iso_utc(commit_ts),
                        "timeline": rwal.timeline_at(plan.spans, lsn), "locked": _locked_tables(inst, c)}
            if replayed != last_lsn:
                last_lsn, last_move = replayed, time.monotonic()
            elif time.monotonic() - last_move > stall_timeout:
                raise ValidationError(f"replay made no progress for {stall_timeout:.0f} s (at {replayed})",
                                      detail=inst.logs(30), hint="the server log says what it waits for")
            time.sleep(PAUSE_POLL)


def _locked_tables(inst, c) -> list[str]:
    """Tables an unfinished transaction locks exclusively at the target (a DROP, TRUNCATE, ALTER that
    committed after it): paused there, reading them waits forever; promotion releases them. ``c``: a
    connection to the server's postgres database."""
    held = c.execute("SELECT d.datname, l.relation FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                     "WHERE l.locktype = 'relation' AND l.mode = 'AccessExclusiveLock' "
                     "ORDER BY 1, 2").fetchall()
    out = []
    for db in sorted({h[0] for h in held}):
        oids = [h[1] for h in held if h[0] == db]
        try:
            with pgconn.session(inst.node(db), db) as dbc:
                names = [r[0] for r in dbc.execute(
                    "SELECT oid::regclass::text FROM pg_class WHERE oid = ANY(%s::oid[]) AND relkind IN "
                    "('r', 'p', 'm', 'v', 'S') ORDER BY 1", (oids,))]
            out += [f"{db}: {n}" for n in names] or [f"{db}: {len(oids)} relation(s) created after the target"]
        except PostgresError:
            out += [f"{db}: relation {o}" for o in oids]
    return out


def _promote(inst, timeout: float) -> int:
    """End recovery at the target (resuming from the pause promotes at once); the new timeline."""
    deadline = time.monotonic() + timeout
    with pgconn.session(inst.node()) as c:
        c.execute("SELECT pg_wal_replay_resume()")
        while pgconn.scalar(c, "SELECT pg_is_in_recovery()"):
            if time.monotonic() > deadline or not inst.is_running():
                raise PostgresError(f"the restored server did not finish promotion within {timeout:.0f} s",
                                    detail=inst.logs(30))
            time.sleep(0.05)
        name = pgconn.scalar(c, "SELECT pg_walfile_name(pg_current_wal_lsn())")
    return int(name[:8], 16)


def _finalize_settings(data: Path, plan: "Plan", reached: dict[str, Any]) -> None:
    """After promotion the recovery target settings go (a later standby must not stop there)."""
    comments = [f"restored backup {plan.backup.backup_id} to {plan.target.describe()} on timeline {plan.timeline}",
                f"reached LSN {reached['lsn']}, last commit {reached['last_commit_time'] or '-'}"]
    settings = dict(plan.settings)
    if "promoted_timeline" in reached:
        comments.append(f"promoted: timeline {reached['promoted_timeline']}")
        settings = {k: v for k, v in settings.items() if k not in rconf.RECOVERY_KEYS and k != "hot_standby"}
        rconf.write_signal(data, recovery=False)
    rconf.write_settings(data, settings, comments)


def start_server(data: Path, bins: str, port: int, timeout: float) -> dict[str, Any]:
    """pg_ctl start as the folder's owner with its own configuration; wait until it accepts connections."""
    import pwd

    owner = pwd.getpwuid(data.stat().st_uid).pw_name
    logdir = data / "log"
    logdir.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        st = data.stat()
        os.chown(logdir, st.st_uid, st.st_gid)
    logfile = logdir / "dbops-restore-start.log"
    try:
        proc.run([os.path.join(bins, "pg_ctl"), "start", "-D", str(data), "-l", str(logfile), "-w",
                  "-t", str(int(timeout))], user=owner, timeout=timeout + 30, what="pg_ctl start",
                 env={"LANG": "C", "LC_ALL": "C"})
    except DbopsError as e:
        tail = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else ""
        raise PostgresError(f"the restored server did not start on port {port}",
                            detail=(e.detail or e.message) + "\n" + tail,
                            hint=f"the folder is restored and stopped cleanly; see {logfile}") from None
    pid = int((data / "postmaster.pid").read_text().splitlines()[0])
    return {"port": port, "pid": pid, "log": str(logfile)}


def _explain(logs: str, plan: "Plan") -> DbopsError:
    """Why the server stopped during recovery, as the error the user can act on."""
    text = logs.lower()
    full = disk_full_lines(logs)
    logs = "\n".join(logs.strip().splitlines()[-15:])
    if full:  # before the rest: a restore_command whose copy failed reads as a segment not in the archive
        return DbopsError(f"PostgreSQL ran out of disk space (ENOSPC: {NO_SPACE}) while recovering the restored folder",
                          detail="\n".join(full[-3:]) + "\n" + logs,
                          hint="free space on the target's filesystem (or its pg_wal's), then run the restore again")
    ends = f"the archive ends at {plan.archive_end['segment']} (LSN {plan.archive_end['lsn']})"
    if "recovery ended before configured recovery target was reached" in text:
        if plan.holes:
            return ValidationError(f"WAL segment {', '.join(plan.holes[:5])} is missing from the archive, on the way "
                                   f"to the target", detail=logs)
        return TargetError(f"replay reached the end of the archive without meeting the target "
                           f"{plan.target.describe()}: {ends}", detail=logs,
                           hint="check the transaction id / restore point name; it may not be archived yet")
    if "before consistent recovery point" in text:
        return TargetError(f"the target {plan.target.describe()} lies before backup {plan.backup.backup_id} "
                           "is consistent", detail=logs,
                           hint="choose an older backup with --backup ID (`dbops backup list`)")
    return PostgresError("PostgreSQL stopped during recovery of the restored folder", detail=logs,
                         hint="the server log above says why")
