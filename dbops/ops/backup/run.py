"""`dbops backup`: the validated chain.

Every run proves the previous backup before it builds the next one:

1. restore the newest usable backup from storage into a scratch folder, with every chunk
   checked against its hash;
2. capture a target on the primary: ``CHECKPOINT``, the WAL insert LSN and the time,
   then ``pg_switch_wal()`` so that the segment holding the target reaches the archive;
3. fetch the WAL from the backup's redo point to the target out of the archive, verified,
   into a folder that is mounted into a throwaway PostgreSQL;
4. start PostgreSQL on the restored copy in that throwaway instance, recovering up to the
   target in hot standby. Reaching consistency and replaying to the target proves both the
   backup and the archive between the two;
5. run the validation checks while it is up: connect to every database, read every table
   (or pg_amcheck it), and run the user's SQL assertions;
6. stop it at the target. The server shuts down in recovery, and that stopped folder is the
   new snapshot. Run ``pg_checksums --check`` on it;
7. store only the chunks that changed, write the manifest last, and record the previous
   backup as ``validated`` together with the measured time of each phase.

The first run, with nothing in the catalog, takes a base backup from the source and carries
it through steps 2 to 7 in the same way, so even the first stored snapshot has been started
and checked.

When validation fails, the previous backup is marked ``failed`` with the reason. With
``heal`` (the default), a fresh full backup follows at once, storing all of its content
again, so the next good backup does not depend on a broken one. The run still exits with
the validation code.
"""

from __future__ import annotations

import errno
import logging
from concurrent.futures import ThreadPoolExecutor
import os
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from dbops import __version__, log, proc
from dbops.repo import catalog
from dbops.repo import manifest as mf
from dbops.repo import pgstate
from dbops.repo import relmap as relmap_store
from dbops.pg import relmap as relmap_reader
from dbops.repo.restore import restore_snapshot
from dbops.repo.store import store_snapshot
from dbops.config import Config, Node
from dbops.errors import (CommandError, DbopsError, NotFoundError, PostgresError, PreconditionError,
                          StorageError, ValidationError)
from dbops.storage.lock import ClusterLock
from dbops.ops.wal import archive as arch
from dbops.pg import binaries, controldata
from dbops.pg import conn as pgconn
from dbops.pg.lsn import format_lsn, segment_of_lsn
from dbops.runtime import InstanceSpec, open_runtime
from dbops.storage import ObjectStore, open_store
from dbops.storage.layout import Layout

_log = log.get("backup")

SCRATCH_PREFIX = "run-"
PG_OS_USER = "postgres"


@dataclass
class Target:
    lsn: int
    time: float
    timeline: int
    segment: str


@dataclass
class Validation:
    backup_id: str
    ok: bool
    timings: dict[str, float] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    reason: str | None = None
    replayed_lsn: int | None = None
    last_commit_time: float | None = None
    relation_map: dict[str, Any] | None = None  # read at the target; stored with the backup taken there


@dataclass
class BackupResult:
    backup_id: str
    kind: str  # full | incremental
    parent_id: str | None
    run_id: str
    validated: Validation | None
    manifest: mf.Manifest
    timings: dict[str, float]
    healed_after: str | None = None  # set when this full backup healed a failed validation

    def as_dict(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "ok": True,
            "backup_id": self.backup_id,
            "kind": self.kind,
            "parent_id": self.parent_id,
            "run_id": self.run_id,
            "consistent_lsn": format_lsn(m.pg.consistent_lsn),
            "consistent_time": m.pg.consistent_time,
            "timeline": m.pg.timeline,
            "logical_size": m.logical_size,
            "stored_bytes": m.stored_bytes,
            "counts": m.counts,
            "timings": self.timings,
            "validated": None if self.validated is None else {
                "backup_id": self.validated.backup_id, "ok": self.validated.ok,
                "timings": self.validated.timings, "checks": self.validated.checks,
                "restore_seconds": restore_seconds(self.validated.timings),
            },
            "healed_after": self.healed_after,
        }


def restore_seconds(t: dict[str, float]) -> float:
    """The measured restore time: download + WAL fetch + start + replay."""
    return round(sum(t.get(k, 0.0) for k in ("download", "wal_fetch", "start", "replay")), 3)


class Phases:
    """Times named phases; logs each as it ends."""

    def __init__(self, progress: Callable[[str], None] | None = None) -> None:
        self.t: dict[str, float] = {}
        self.progress = progress
        self.current: str | None = None  # the phase entered last (the one an error came from)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.current = name
        if self.progress:
            self.progress(name)
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.t[name] = round(self.t.get(name, 0.0) + time.monotonic() - t0, 3)
            log.event(_log, logging.INFO, f"phase {name} done", seconds=self.t[name])


# --------------------------------------------------------------------------- helpers


def find_primary(cfg: Config) -> Node:
    """The node that is not in recovery (exactly one must be)."""
    primaries, errors = [], []
    for n in cfg.nodes:
        try:
            with pgconn.session(n) as c:
                if not pgconn.scalar(c, "SELECT pg_is_in_recovery()"):
                    primaries.append(n)
        except DbopsError as e:
            errors.append(f"{n.name}: {e.message}")
    if len(primaries) == 1:
        return primaries[0]
    if not primaries:
        raise PostgresError("no reachable primary among the configured nodes",
                            detail="; ".join(errors) or None, hint="dbops check shows each node's state")
    raise PreconditionError("more than one primary: " + ", ".join(n.name for n in primaries),
                            hint="split brain: stop all but one primary")


def source_node(cfg: Config, primary: Node) -> Node:
    return cfg.node(cfg.backup.source) if cfg.backup.source else primary


def _pg_env(node: Node) -> dict[str, str]:
    """libpq environment for a child process: the password travels here, never in argv."""
    env = {"PGCONNECT_TIMEOUT": "10"}
    if node.password:
        env["PGPASSWORD"] = node.password
    if node.passfile:
        env["PGPASSFILE"] = node.passfile
    if node.sslmode:
        env["PGSSLMODE"] = node.sslmode
    return env


def _chown_pg(path: Path) -> None:
    if os.geteuid() == 0:
        import pwd

        pw = pwd.getpwnam(PG_OS_USER)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_stale_scratch(scratch_root: Path) -> list[str]:
    """Remove scratch folders of runs whose process is gone (a run killed with SIGKILL)."""
    removed = []
    if not scratch_root.is_dir():
        return removed
    for d in scratch_root.iterdir():
        if not d.name.startswith(SCRATCH_PREFIX):
            continue
        try:
            pid = int(d.name[len(SCRATCH_PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not proc.pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    return removed


SCRATCH_MARGIN = 256 * 2**20  # WAL replayed into the copy, the server's own files
NO_SPACE = "No space left on device"  # strerror(ENOSPC), as programs and PostgreSQL's log print it


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def scratch_needed(data_size: int) -> int:
    """What a run needs in the scratch folder for a copy of data_size bytes."""
    return int(data_size * 1.1) + SCRATCH_MARGIN


def check_scratch_space(scratch_root: Path, data_size: int) -> None:
    """Refuse before any work when the scratch folder cannot hold the copy (exit 11)."""
    scratch_root.mkdir(parents=True, exist_ok=True)
    free, needed = _free_bytes(scratch_root), scratch_needed(data_size)
    if free < needed:
        raise PreconditionError(
            f"not enough free space in the scratch folder {scratch_root}: {_size(free)} free, "
            f"about {_size(needed)} needed",
            detail=f"free {free} bytes; needed {needed} bytes = the data to restore ({data_size} bytes) + 10 % "
                   f"+ {_size(SCRATCH_MARGIN)} for the WAL replayed into it; nothing was done",
            hint="free space there, or point backup.scratch_dir at a larger filesystem",
        )


def out_of_space(e: BaseException) -> bool:
    """Did e come from a full disk (ENOSPC), directly or as a program's or PostgreSQL's message?"""
    if isinstance(e, OSError):
        return e.errno == errno.ENOSPC
    if isinstance(e, DbopsError):
        return any(NO_SPACE in (t or "") for t in (e.message, e.detail, getattr(e, "stderr", None)))
    return False


def scratch_full_error(scratch_root: Path, phase: str | None, e: BaseException) -> DbopsError:
    """The one message for a scratch folder that filled up mid-run (the run's own folder is already gone)."""
    cause = e.message + ("\n" + e.detail if e.detail else "") if isinstance(e, DbopsError) else str(e)
    try:
        free = f"{_size(_free_bytes(scratch_root))} free there now"
    except OSError:
        free = "free space unknown"
    return DbopsError(
        f"the scratch folder {scratch_root} ran out of space (ENOSPC: {NO_SPACE})"
        + (f" during phase {phase}" if phase else ""),
        detail=f"{free}; this run's scratch folder and container were removed, nothing was stored and no "
               f"backup was marked failed\n" + cause[-1500:],
        hint="free space there (other files may have filled it), or point backup.scratch_dir at a larger "
             "filesystem, then run again",
    )


# --------------------------------------------------------------------------- the source side


SWITCH_LOCK = "switch"  # also taken by `dbops failover`: a capture never interleaves with a switchover
PRIMARY_PROBE_INTERVAL = 5.0  # while waiting for the target's segment: is the primary still there?


class ArchiveStalledError(ValidationError):
    """The target's segment did not reach the archive: archiving is stuck (exit 7), which says nothing
    against the previous backup, so it is not marked failed."""


def _require_primary_up(primary: Node, segment: str) -> None:
    try:
        with pgconn.session(primary) as c:
            c.execute("SELECT 1")
    except PostgresError as e:
        raise PostgresError(
            f"the primary {primary.name} went away while dbops waited for WAL segment {segment} to be archived",
            detail=e.detail or e.message,
            hint="start the primary again (its archiver then archives the segment) and run dbops backup again; "
                 "nothing was stored by this run",
        ) from None


def capture_target(cfg: Config, *, archive_wait: float, store: ObjectStore, layout: Layout) -> Target:
    """On the current primary (found under the switch lock): CHECKPOINT, note the insert LSN and
    time, switch WAL; then wait until that segment is archived."""
    with ClusterLock(store, layout, SWITCH_LOCK, command="backup (target capture)"):
        try:
            primary = find_primary(cfg)
        except PostgresError as e:  # it was there when the run began
            raise PostgresError(f"cannot capture the backup's target: {e.message}", detail=e.detail,
                                hint="the primary went away mid-run; start it again and run dbops backup again "
                                     "(nothing was stored by this run)") from None
        with pgconn.session(primary) as c:
            c.execute("CHECKPOINT")
            row = c.execute("SELECT pg_current_wal_insert_lsn()::text, extract(epoch from clock_timestamp())::float8, "
                            "(SELECT timeline_id FROM pg_control_checkpoint())").fetchone()
            c.execute("SELECT pg_switch_wal()")
    from dbops.pg.lsn import parse_lsn

    lsn, t, tli = parse_lsn(row[0]), float(row[1]), int(row[2])
    seg = segment_of_lsn(tli, lsn)
    key = layout.wal_key(seg)
    deadline = time.monotonic() + archive_wait
    next_probe = time.monotonic() + PRIMARY_PROBE_INTERVAL
    while store.head(key) is None:
        now = time.monotonic()
        if now > deadline:
            raise ArchiveStalledError(
                f"WAL segment {seg} (holding the backup's target {format_lsn(lsn)}) did not reach the archive "
                f"within {archive_wait:.0f} s",
                hint="is archiving working? `dbops wal status` and the primary's log show why not",
            )
        if now > next_probe:
            _require_primary_up(primary, seg)
            next_probe = now + PRIMARY_PROBE_INTERVAL
        time.sleep(0.2)
    log.event(_log, logging.INFO, "target captured", lsn=format_lsn(lsn), timeline=tli, segment=seg)
    return Target(lsn=lsn, time=t, timeline=tli, segment=seg)


def base_backup(source: Node, data: Path, *, timeout: float = 24 * 3600) -> None:
    """pg_basebackup from the source into data (with the WAL it needs), as the postgres OS user."""
    data.parent.mkdir(parents=True, exist_ok=True)
    try:
        proc.run([binaries.binary("pg_basebackup", source.bin_dir), "-h", source.host, "-p", str(source.port),
                  "-U", source.user, "-D", str(data), "-X", "stream", "-c", "fast", "--no-sync", "--no-manifest",
                  "-w"], user=PG_OS_USER, env=_pg_env(source), timeout=timeout, what="pg_basebackup")
    except CommandError as e:
        if out_of_space(e):
            raise  # the scratch disk, not PostgreSQL: BackupRun says so
        raise PostgresError(
            f"pg_basebackup from {source.name} ({source.host}:{source.port}) failed: {e.message}", detail=e.detail,
            hint="its own message (detail) says why: the source down or unreachable, access refused, ...",
        ) from None


def backup_label_start(data: Path) -> str:
    """The WAL segment a fresh base backup starts from (backup_label's START WAL LOCATION)."""
    try:
        text = (data / "backup_label").read_text()
    except FileNotFoundError:
        raise DbopsError(f"the base backup in {data} has no backup_label") from None
    for line in text.splitlines():
        if line.startswith("START WAL LOCATION:") and "(file " in line:
            return line.split("(file ", 1)[1].rstrip(")").strip()
    raise DbopsError("cannot read START WAL LOCATION from backup_label", detail=text[:500])


# --------------------------------------------------------------------------- validation run


RECOVERY_SETTINGS_BASE = {
    "hot_standby": "on",
    "recovery_target_action": "pause",
    "recovery_target_inclusive": "on",
    # A copy of production must not need production's memory or extensions.
    "shared_buffers": "256MB",
    "huge_pages": "off",
    "shared_preload_libraries": "",
    "max_wal_size": "4GB",  # no restartpoints forced by WAL volume while replaying
    # The scratch copy is thrown away if the host crashes mid-run; what is stored is read after a
    # clean shutdown, from the page cache. So no fsync: replay and the shutdown restartpoint are
    # bound by the CPU, not by the disk's flush rate.
    "fsync": "off",
    "maintenance_io_concurrency": "32",
    # Hint bits set by the checks must not reach the stored pages: with this on, a server in
    # recovery never writes a page only for its hint bits, so a page whose LSN is not newer
    # than the previous backup's REDO point is byte for byte what that backup stored (the
    # store reuses it without hashing; see dbops/repo/blocks.py).
    "wal_log_hints": "on",
}
RECOVERY_SETTINGS_PG15 = {"recovery_prefetch": "try"}  # PostgreSQL 15+


# Hot standby refuses to start when these are below the source's values (pg_control keeps them).
_STANDBY_MINIMUMS = {
    "max_connections": "max_connections setting",
    "max_worker_processes": "max_worker_processes setting",
    "max_wal_senders": "max_wal_senders setting",
    "max_prepared_transactions": "max_prepared_xacts setting",
    "max_locks_per_transaction": "max_locks_per_xact setting",
}


def standby_minimums(data: Path) -> dict[str, str]:
    """Settings a throwaway hot standby needs from the source, read from the copy's pg_control.

    They matter when the source keeps its configuration outside the data folder (Debian's
    /etc/postgresql), so the copy would otherwise start on defaults. Messages and formats in
    the C locale, which every image has."""
    cd = controldata.read(str(data))
    out = {k: cd.raw[v] for k, v in _STANDBY_MINIMUMS.items() if cd.raw.get(v, "").isdigit()}
    out.update({"lc_messages": "C", "lc_monetary": "C", "lc_numeric": "C", "lc_time": "C"})
    return out


def _pg_major(data: Path) -> int:
    try:
        return int((data / "PG_VERSION").read_text().strip().split(".")[0])
    except (OSError, ValueError):
        return 0


def _write_recovery_signal(data: Path) -> None:
    p = data / "recovery.signal"
    p.write_text("")
    _chown_pg(p)
    for stale in ("standby.signal", "backup_label.old"):
        (data / stale).unlink(missing_ok=True)


LOG_CHECK_INTERVAL = 2.0
# Connections fail with this when the relcache init file cannot be written; with the disk (nearly)
# full that is ENOSPC too, though the log line does not say so.
INIT_FILE_FAILED = "could not write init file"
NEARLY_FULL = 16 * 2**20  # less than a WAL segment: recovery cannot go on


def _fail_on_full_disk(inst, data: Path) -> None:
    """A full scratch disk makes recovery wait for ever (restore_command cannot copy a segment, every
    connection fails): raise ENOSPC at once instead of waiting for the start timeout."""
    lines = inst.logs(200).splitlines()
    hits = [line for line in lines if NO_SPACE in line]
    if not hits and _free_bytes(data) < NEARLY_FULL:
        hits = [line for line in lines if INIT_FILE_FAILED in line]
    if hits:
        raise OSError(errno.ENOSPC, f"PostgreSQL on the restored copy ran out of disk space: {hits[-1].strip()}")


def _wait_paused(inst, data: Path, target: Target, timeout: float) -> tuple[int, float | None]:
    """Wait until replay paused at the target; return (replayed LSN, last replayed commit time)."""
    from dbops.pg.lsn import parse_lsn

    deadline = time.monotonic() + timeout
    node = inst.node()
    last_err: str | None = None
    next_log_check = time.monotonic() + LOG_CHECK_INTERVAL
    while time.monotonic() < deadline:
        if time.monotonic() > next_log_check:
            _fail_on_full_disk(inst, data)
            next_log_check = time.monotonic() + LOG_CHECK_INTERVAL
        if not inst.is_running():
            raise ValidationError("PostgreSQL stopped during recovery before reaching the target",
                                  detail=inst.logs(30))
        try:
            with pgconn.session(node) as c:
                row = c.execute("SELECT pg_get_wal_replay_pause_state(), pg_last_wal_replay_lsn()::text, "
                                "extract(epoch from pg_last_xact_replay_timestamp())::float8, "
                                "pg_is_in_recovery()").fetchone()
            state, replayed, commit_ts, in_rec = row
            if not in_rec:
                raise ValidationError("the throwaway instance left recovery instead of pausing at the target")
            if state == "paused" and replayed and parse_lsn(replayed) >= target.lsn:
                return parse_lsn(replayed), commit_ts
        except PostgresError as e:
            last_err = e.detail or e.message
        time.sleep(0.1)
    raise ValidationError(f"replay did not reach the target {format_lsn(target.lsn)} within {timeout:.0f} s",
                          detail=(last_err + "\n" if last_err else "") + inst.logs(30))


def _databases(node: Node) -> list[str]:
    with pgconn.session(node) as c:
        return [r[0] for r in c.execute("SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1")]


def run_checks(cfg: Config, inst, checks: list[dict[str, Any]]) -> None:
    """Connect to every database, read every table (pg_amcheck where amcheck is installed), run assertions."""
    v = cfg.backup.validation
    for db in _databases(inst.node()):
        node = inst.node(db)
        try:
            with pgconn.session(node, db) as c:
                has_amcheck = bool(pgconn.scalar(c, "SELECT count(*) FROM pg_extension WHERE extname = 'amcheck'"))
                tables = [r[0] for r in c.execute(
                    "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE c.relkind IN ('r', 'm', 't') AND c.relpersistence = 'p' ORDER BY 1")]
                if not (v.amcheck and has_amcheck):
                    rows = 0
                    for t in tables:
                        rows += int(pgconn.scalar(c, f"SELECT count(*) FROM {t}"))
                    checks.append({"check": "read_tables", "database": db, "ok": True, "tables": len(tables),
                                   "rows": rows})
        except PostgresError as e:
            checks.append({"check": "read_tables", "database": db, "ok": False, "error": e.detail or e.message})
            raise ValidationError(f"database {db} of the restored backup cannot be read",
                                  detail=e.detail or e.message) from None
        if v.amcheck and has_amcheck:
            r = inst.run_tool([_tool(cfg, "pg_amcheck"), "-d", db, "--no-strict-names"], check=False, timeout=24 * 3600)
            ok = r.returncode == 0
            checks.append({"check": "pg_amcheck", "database": db, "ok": ok, "tables": len(tables)})
            if not ok:
                raise ValidationError(f"pg_amcheck found corruption in database {db} of the restored backup",
                                      detail=(r.stdout + r.stderr)[-2000:])
    for a in v.assertions:
        try:
            with pgconn.session(inst.node(a.database), a.database) as c:
                val = pgconn.scalar(c, a.sql)
        except PostgresError as e:
            checks.append({"check": "assertion", "name": a.name, "ok": False, "error": e.detail or e.message})
            raise ValidationError(f"assertion {a.name!r} failed with an error", detail=e.detail or e.message) from None
        ok = val is True
        checks.append({"check": "assertion", "name": a.name, "ok": ok, "value": repr(val)})
        if not ok:
            raise ValidationError(f"assertion {a.name!r} did not hold on the restored backup",
                                  detail=f"{a.sql} returned {val!r}, expected true")


def read_relation_map(inst) -> dict[str, Any] | None:
    """Which relfilenodes are which tables at the target (for `restore --before-drop`); a failure to
    read it costs that feature for this backup, never the backup."""
    try:
        return relmap_reader.read(inst.node, inst.node())
    except DbopsError as e:
        log.event(_log, logging.WARNING, "could not read the relation map", error=e.message, detail=e.detail)
        return None


def _tool(cfg: Config, name: str) -> str:
    """A PostgreSQL tool's path as the runtime sees it (host bin dir for rootfs/none, PATH in an image)."""
    if cfg.runtime.engine != "none" and cfg.runtime.image:
        return os.path.join(cfg.runtime.bin_dir, name) if cfg.runtime.bin_dir else name
    return binaries.binary(name, cfg.runtime.bin_dir)


def recover_to_target(cfg: Config, data: Path, wal_dir: Path, target: Target, phases: Phases,
                      name: str) -> Validation:
    """Start PostgreSQL on data in a throwaway instance, replay to target, check, stop cleanly."""
    val = Validation(backup_id="", ok=False)
    settings = dict(RECOVERY_SETTINGS_BASE)
    if _pg_major(data) >= 15:
        settings.update(RECOVERY_SETTINGS_PG15)
    settings.update(standby_minimums(data))
    settings["recovery_target_lsn"] = format_lsn(target.lsn)
    settings["recovery_target_timeline"] = str(target.timeline)
    _write_recovery_signal(data)
    rt = open_runtime(cfg.runtime)
    timeout = cfg.backup.validation.start_timeout
    with phases("start"):
        inst = rt.start(InstanceSpec(data_dir=data, port=_free_port(), wal_dir=wal_dir, settings=settings, name=name))
    with inst:
        with phases("start"):
            try:
                inst.wait_ready(timeout)
            except DbopsError as e:
                raise ValidationError("PostgreSQL did not start on the restored backup",
                                      detail=(e.detail or e.message) + "\n" + inst.logs(30)) from None
        with phases("replay"):
            val.replayed_lsn, val.last_commit_time = _wait_paused(inst, data, target, timeout)
        val.checks.append({"check": "consistency", "ok": True, "replayed_lsn": format_lsn(val.replayed_lsn)})
        with phases("checks"):
            run_checks(cfg, inst, val.checks)
            val.relation_map = read_relation_map(inst)
        with phases("stop"):
            inst.stop("fast", timeout=timeout)
        cd = controldata.read(str(data), bin_dir=None)
        if cd.state != "shut down in recovery":
            raise ValidationError(f"the throwaway instance did not stop in recovery (state: {cd.state})",
                                  detail=inst.logs(30))
        if cfg.backup.validation.checksums and cd.data_checksums:
            with phases("checksums"):
                r = inst.run_tool([_tool(cfg, "pg_checksums"), "--check", "-D", inst.data_path], check=False,
                                  timeout=24 * 3600)
            ok = r.returncode == 0
            val.checks.append({"check": "pg_checksums", "ok": ok})
            if not ok:
                raise ValidationError("pg_checksums found bad pages in the restored backup",
                                      detail=(r.stdout + r.stderr)[-2000:])
    val.ok = True
    return val


# --------------------------------------------------------------------------- the run




@contextmanager
def scratch_folder(root: Path, run_id: str) -> Iterator[Path]:
    root.mkdir(parents=True, exist_ok=True)
    d = root / f"{SCRATCH_PREFIX}{os.getpid()}-{run_id}"
    d.mkdir(mode=0o700)
    _chown_pg(d)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class BackupRun:
    def __init__(self, cfg: Config, *, store: ObjectStore | None = None, progress: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.store = store or open_store(cfg.storage)
        self.layout = Layout(cfg.storage.prefix)
        self.run_id = catalog.new_backup_id().split("-", 1)[1] + f"{os.getpid():x}"
        self.progress = progress
        self.scratch_root = Path(cfg.backup.scratch_dir)
        self.phases: Phases | None = None  # of the part running now (full or incremental)

    # -- public

    def run(self, *, full: bool = False) -> BackupResult:
        with proc.sigterm_as_interrupt(), ClusterLock(self.store, self.layout, "backup", command="backup"):
            clean_stale_scratch(self.scratch_root)
            primary = find_primary(self.cfg)
            backups = catalog.list_backups(self.store, self.layout)
            prev = next((b for b in reversed(backups) if b.usable), None)
            try:
                if prev is None or full:
                    return self._full(primary, reason="first backup" if prev is None else "--full requested")
                return self._validate_and_build(primary, prev)
            except (OSError, DbopsError) as e:
                if out_of_space(e):
                    raise scratch_full_error(self.scratch_root, self.phases and self.phases.current, e) from None
                raise

    def _validate_and_build(self, primary: Node, prev: catalog.BackupInfo) -> BackupResult:
        """The next link; a failed validation marks prev failed and (with heal) takes a fresh full backup."""
        try:
            return self._incremental(primary, prev)
        except ValidationError as e:
            if isinstance(e, ArchiveStalledError) or out_of_space(e):
                raise  # not the previous backup's fault
            self._mark_failed(prev.backup_id, e)
            if not self.cfg.backup.validation.heal:
                raise
            log.event(_log, logging.WARNING, "validation failed; healing with a fresh full backup",
                      backup=prev.backup_id, reason=e.message)
            healed = self._full(primary, reason=f"healing after {prev.backup_id} failed validation")
            healed.healed_after = prev.backup_id
            raise ValidationError(
                f"backup {prev.backup_id} failed validation: {e.message}",
                detail=(e.detail + "\n" if e.detail else "")
                + f"the chain was healed: new full backup {healed.backup_id} stored and validated at start",
                hint="the failed backup stays listed as failed; investigate the storage or archive it names",
            ) from None

    # -- phases

    def _full(self, primary: Node, *, reason: str) -> BackupResult:
        cfg = self.cfg
        source = source_node(cfg, primary)
        phases = self.phases = Phases(self.progress)
        with pgconn.session(source) as c:
            size = int(pgconn.scalar(c, "SELECT sum(pg_database_size(oid))::bigint FROM pg_database") or 0)
        check_scratch_space(self.scratch_root, size)
        log.event(_log, logging.INFO, "full backup", reason=reason, source=source.name)
        with scratch_folder(self.scratch_root, self.run_id) as scratch:
            data, wal = scratch / "data", scratch / "wal"
            wal.mkdir()
            _chown_pg(wal)
            with phases("basebackup"):
                base_backup(source, data)
            start_segment = backup_label_start(data)
            with phases("capture"):
                target = capture_target(cfg, archive_wait=cfg.archive.push_timeout * 2, store=self.store,
                                        layout=self.layout)
            with phases("wal_fetch"):
                self._fetch_wal(start_segment, target, wal)
            val = recover_to_target(cfg, data, wal, target, phases, name=f"backup-{self.run_id}")
            manifest = self._store(data, target, val, phases, parents=(), parent_id=None, kind="full")
        # Started and checked before it was stored; `validated` comes when a later run restores it from storage.
        catalog.record_status(self.store, self.layout, manifest.backup_id, catalog.STORED, run_id=self.run_id,
                              phase="first-start", timings=dict(phases.t),
                              detail={"checks": val.checks, "kind": "full", "reason": reason})
        return BackupResult(manifest.backup_id, "full", None, self.run_id, None, manifest, phases.t)

    def _incremental(self, primary: Node, prev: catalog.BackupInfo) -> BackupResult:
        cfg = self.cfg
        phases = self.phases = Phases(self.progress)
        prev_m = mf.load(self.store, self.layout, prev.backup_id)
        check_scratch_space(self.scratch_root, prev_m.logical_size)
        with scratch_folder(self.scratch_root, self.run_id) as scratch:
            data, wal = scratch / "data", scratch / "wal"
            wal.mkdir()
            _chown_pg(wal)
            # The target first, so the WAL up to it downloads while the backup does.
            with phases("capture"):
                target = capture_target(cfg, archive_wait=cfg.archive.push_timeout * 2, store=self.store,
                                        layout=self.layout)
            start_segment = segment_of_lsn(prev_m.pg.timeline, prev_m.pg.redo_lsn)
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dbops-wal") as pool:
                t_wal = time.monotonic()
                wal_job = pool.submit(self._fetch_wal, start_segment, target, wal)
                wal_job.add_done_callback(lambda _f: phases.t.__setitem__(
                    "wal_fetch", round(time.monotonic() - t_wal, 3)))
                with phases("download"):
                    try:
                        restore_snapshot(self.store, self.layout, prev_m, str(data), parallel=cfg.backup.parallel,
                                         owner=PG_OS_USER)
                    except (NotFoundError, StorageError) as e:
                        if isinstance(e, StorageError) and not isinstance(e, NotFoundError):
                            raise
                        raise ValidationError(f"backup {prev.backup_id} cannot be restored: {e.message}",
                                              detail=e.detail) from None
                wal_job.result()  # a gap or a storage error in the WAL download surfaces here
            val = recover_to_target(cfg, data, wal, target, phases, name=f"backup-{self.run_id}")
            val.backup_id = prev.backup_id
            manifest = self._store(data, target, val, phases, parents=(prev_m,), parent_id=prev.backup_id,
                                   kind="incremental", unchanged_lsn=prev_m.pg.redo_lsn)
        val.timings = {k: v for k, v in phases.t.items() if k in ("download", "wal_fetch", "start", "replay",
                                                                  "checks", "stop", "checksums")}
        catalog.record_status(self.store, self.layout, prev.backup_id, catalog.VALIDATED, run_id=self.run_id,
                              phase="validate", timings=val.timings,
                              detail={"checks": val.checks, "by_backup": manifest.backup_id,
                                      "restore_seconds": restore_seconds(val.timings),
                                      "replayed_to": format_lsn(val.replayed_lsn or 0)})
        return BackupResult(manifest.backup_id, "incremental", prev.backup_id, self.run_id, val, manifest, phases.t)

    def _fetch_wal(self, start_segment: str, target: Target, wal: Path) -> None:
        try:
            arch.fetch_range(self.store, self.layout, start_segment, target.segment, wal,
                             parallel=max(2, self.cfg.archive.parallel))
        except NotFoundError as e:
            raise ValidationError(f"WAL needed for replay is missing from the archive: {e.message}",
                                  detail=e.detail) from None
        for f in wal.iterdir():
            _chown_pg(f)

    def _store(self, data: Path, target: Target, val: Validation, phases: Phases, *, parents, parent_id,
               kind: str, unchanged_lsn: int | None = None) -> mf.Manifest:
        cfg = self.cfg
        backup_id = catalog.new_backup_id()
        # Consistent at the captured target: everything before it is in the snapshot, and the
        # segment holding it is archived (the replay went on to the end of the switch record).
        pg = pgstate.read(str(data), consistent_lsn=target.lsn, consistent_time=target.time)
        with phases("store"):
            if val.relation_map is not None:  # before the manifest: a listed backup has its map
                relmap_store.save(self.store, self.layout, backup_id, val.relation_map)
            manifest = store_snapshot(
                self.store, self.layout, str(data), backup_id=backup_id, parent_manifests=parents,
                compression=cfg.compression, chunk_size=cfg.backup.chunk_size, pack_size=cfg.backup.pack_size,
                parallel=cfg.backup.parallel, pg=pg, parent_id=parent_id, timings=dict(phases.t),
                unchanged_lsn=unchanged_lsn, tmp_dir=str(data.parent),
                meta={"kind": kind, "run_id": self.run_id, "target_lsn": format_lsn(target.lsn),
                      "replayed_lsn": format_lsn(val.replayed_lsn or target.lsn),
                      "target_time": target.time, "last_commit_time": val.last_commit_time,
                      "host": socket.gethostname(), "dbops_version": __version__, "checks": val.checks},
            )
        log.event(_log, logging.INFO, "backup stored", backup=backup_id, kind=kind,
                  stored_bytes=manifest.stored_bytes, logical_size=manifest.logical_size)
        return manifest

    def _mark_failed(self, backup_id: str, e: ValidationError) -> None:
        try:
            catalog.record_status(self.store, self.layout, backup_id, catalog.FAILED, run_id=self.run_id,
                                  phase="validate", reason=e.message, detail={"detail": (e.detail or "")[-4000:]})
        except DbopsError as e2:  # the validation error is what matters; say that recording failed too
            log.event(_log, logging.ERROR, "could not record the failed validation", error=e2.message)


def run_backup(cfg: Config, *, full: bool = False, progress: Callable[[str], None] | None = None,
               store: ObjectStore | None = None) -> BackupResult:
    return BackupRun(cfg, store=store, progress=progress).run(full=full)
