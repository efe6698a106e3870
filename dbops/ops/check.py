"""`dbops check`: the preflight a user runs before trusting dbops.

Every finding names what it looked at, what it saw, and (when not ok) what to fix.
A `fail` finding means something blocks backups, archiving, restore or failover.
"""

from __future__ import annotations

import secrets as pysecrets
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from dbops import log
from dbops.config import Config
from dbops.errors import DbopsError, NotFoundError
from dbops.pg.inspect import STANDBY, NodeState, probe_all

_log = log.get("check")

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass
class Finding:
    area: str  # node:<name> | storage | runtime | cluster
    check: str
    status: str  # ok | warn | fail
    message: str
    fix: str | None = None


@dataclass
class NodeReport:
    name: str
    reachable: bool = False
    role: str | None = None  # primary | standby
    upstream: str | None = None  # for a standby: the configured node it streams from (or host:port)
    version: str | None = None
    version_num: int | None = None
    system_identifier: str | None = None
    timeline: int | None = None
    wal_level: str | None = None
    archive_mode: str | None = None
    archive_command: str | None = None
    archive_uses_dbops: bool | None = None
    data_checksums: bool | None = None
    wal_log_hints: bool | None = None
    replication: list[dict] = field(default_factory=list)
    receiver: dict | None = None
    replay_lag_bytes: int | None = None
    replay_paused: bool | None = None
    archiver: dict | None = None


@dataclass
class CheckReport:
    findings: list[Finding] = field(default_factory=list)
    nodes: list[NodeReport] = field(default_factory=list)
    storage: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)
    tablespaces: list[dict[str, Any]] = field(default_factory=list)  # the primary's, and the newest backup's cover

    def add(self, area: str, check: str, status: str, message: str, fix: str | None = None) -> None:
        self.findings.append(Finding(area, check, status, message, fix))

    @property
    def ok(self) -> bool:
        return not any(f.status == FAIL for f in self.findings)

    def as_dict(self) -> dict:
        return {
            "ok": self.ok,
            "findings": [asdict(f) for f in self.findings],
            "nodes": [asdict(n) for n in self.nodes],
            "storage": self.storage,
            "runtime": self.runtime,
            "tablespaces": self.tablespaces,
        }


# --------------------------------------------------------------------------- nodes


def node_report(st: NodeState) -> NodeReport:
    """What check shows of one node, from its probe (:func:`dbops.pg.inspect.probe`)."""
    rep = NodeReport(name=st.name)
    if not st.reachable:
        return rep
    settings = st.settings
    rep.reachable = True
    rep.role = st.role
    rep.version, rep.version_num = st.version, st.version_num
    rep.system_identifier = st.system_identifier
    rep.timeline = st.timeline
    rep.wal_level = settings.get("wal_level")
    rep.archive_mode = settings.get("archive_mode")
    rep.archive_command = settings.get("archive_command")
    rep.archive_uses_dbops = bool(rep.archive_command and "dbops" in rep.archive_command
                                  and "wal-push" in rep.archive_command)
    rep.data_checksums = settings.get("data_checksums") == "on"
    rep.wal_log_hints = settings.get("wal_log_hints") == "on"
    if st.role == STANDBY:
        r = st.receiver
        if r:
            rep.receiver = {"status": r.status, "sender_host": r.sender_host, "sender_port": r.sender_port,
                            "received_tli": r.timeline}
        rep.replay_paused = st.replay_paused
        if st.receive_lsn is not None and st.replay_lsn is not None:
            rep.replay_lag_bytes = st.receive_lsn - st.replay_lsn
    else:
        for x in st.senders:
            lag = st.current_lsn - x.replay_lsn if st.current_lsn is not None and x.replay_lsn is not None else None
            rep.replication.append({"application_name": x.application_name, "client_addr": x.client_addr,
                                    "state": x.state, "sync_state": x.sync_state, "replay_lag_bytes": lag})
        a = st.archiver
        if a is not None:
            rep.archiver = {"archived_count": a.archived_count, "last_archived_wal": a.last_archived_wal,
                            "last_archived_time": _iso(a.last_archived_time), "failed_count": a.failed_count,
                            "last_failed_wal": a.last_failed_wal, "last_failed_time": _iso(a.last_failed_time),
                            "failing": a.failing}
    return rep


def _iso(epoch: float | None) -> str | None:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat() if epoch else None


def _check_nodes(cfg: Config, report: CheckReport) -> None:
    for st in probe_all(cfg.nodes):
        node = st.node
        area = f"node:{node.name}"
        rep = node_report(st)
        report.nodes.append(rep)
        if not st.reachable:
            report.add(area, "reachable", FAIL, f"cannot connect to {node.host}:{node.port}: {st.error}",
                       f"start PostgreSQL on node {node.name} (e.g. pg_ctl start -D {node.data_dir or 'PGDATA'}), "
                       "or fix its host/port/user/password in the configuration")
            continue
        report.add(area, "reachable", OK,
                   f"{rep.role}, PostgreSQL {rep.version}, system {rep.system_identifier}, timeline {rep.timeline}")
        if rep.version_num and not (130000 <= rep.version_num < 180000):
            report.add(area, "version", WARN, f"PostgreSQL {rep.version} is outside the supported 13-17",
                       "dbops is tested on 15 and designed for 13-17")
        if rep.wal_level not in ("replica", "logical"):
            report.add(area, "wal_level", FAIL, f"wal_level is {rep.wal_level}; backups and replicas need replica",
                       "set wal_level = replica in postgresql.conf and restart")
        if not (rep.data_checksums or rep.wal_log_hints):
            report.add(area, "rewind", WARN, "neither data checksums nor wal_log_hints are on: after a failover the "
                       "old primary cannot be rewound, and pg_checksums cannot validate backups",
                       "set wal_log_hints = on (restart), or enable checksums with pg_checksums --enable")
        if rep.role == "primary":
            if rep.archive_mode not in ("on", "always"):
                report.add(area, "archive_mode", FAIL,
                           f"archive_mode is {rep.archive_mode}: no WAL reaches the archive, so no point-in-time "
                           "restore and no backup validation",
                           "set archive_mode = on and archive_command = 'dbops wal-push %p' in postgresql.conf, "
                           "then restart")
            elif not rep.archive_uses_dbops:
                report.add(area, "archive_command", FAIL,
                           f"archive_command does not call dbops wal-push: {rep.archive_command!r}",
                           "set archive_command = 'dbops -c /etc/dbops/dbops.yaml wal-push %p' and reload")
            else:
                report.add(area, "archiving", OK, "archive_mode on, archive_command calls dbops wal-push")
            if rep.archiver and rep.archiver.get("failing"):
                report.add(area, "archiver", FAIL,
                           f"the archiver is failing: last failure on {rep.archiver['last_failed_wal']} at "
                           f"{rep.archiver['last_failed_time']} ({rep.archiver['failed_count']} failures)",
                           "read the PostgreSQL log for the archive_command's error; `dbops wal status` shows "
                           "what is archived")
        else:
            recv = rep.receiver
            if not recv or recv.get("status") != "streaming":
                report.add(area, "streaming", FAIL, "standby is not streaming from a primary"
                           + (f" (receiver {recv['status']})" if recv else ""),
                           "check primary_conninfo and that the primary is reachable; see the standby's log")
            else:
                rep.upstream = st.upstream
                report.add(area, "streaming", OK, f"streaming from {rep.upstream}, replay lag "
                           f"{rep.replay_lag_bytes or 0} bytes")
            if rep.replay_paused:
                report.add(area, "replay", WARN, "WAL replay is paused on this standby",
                           "SELECT pg_wal_replay_resume(); a paused standby cannot be a failover candidate")

    up_nodes = [n for n in report.nodes if n.reachable]
    primaries = [n for n in up_nodes if n.role == "primary"]
    if len(primaries) == 0 and up_nodes:
        report.add("cluster", "primary", FAIL, "no reachable node is a primary",
                   "start the primary, or promote a standby (dbops failover needs a running primary)")
    elif len(primaries) > 1:
        report.add("cluster", "primary", FAIL, "more than one primary: " + ", ".join(n.name for n in primaries),
                   "split brain: stop all but one primary and rejoin the others as standbys")
    ids = {n.system_identifier for n in up_nodes}
    if len(ids) > 1:
        report.add("cluster", "system_identifier", FAIL,
                   "nodes belong to different clusters: " + ", ".join(f"{n.name}={n.system_identifier}" for n in up_nodes),
                   "every node in one configuration must be a copy of the same cluster")
    if primaries:
        p = primaries[0]
        streaming = {r["application_name"] for r in p.replication if r["state"] == "streaming"}
        standbys = [n for n in report.nodes if n.role == "standby" or not n.reachable]
        if standbys and not streaming:
            report.add("cluster", "replication", WARN, f"primary {p.name} has no streaming standby")


# --------------------------------------------------------------------------- storage


def _check_storage(cfg: Config, report: CheckReport, store=None) -> None:
    from dbops.storage import open_archive

    s = cfg.storage
    where = f"{s.endpoint or 'AWS S3'} bucket {s.bucket}"
    report.storage = {"endpoint": s.endpoint, "bucket": s.bucket, "prefix": s.prefix}
    try:
        store, layout = open_archive(s, store)
        store.check()
    except DbopsError as e:
        report.storage["reachable"] = False
        report.add("storage", "reachable", FAIL, f"{where}: {e.message}", e.hint)
        return
    report.storage["reachable"] = True
    key = layout.probe(f"check-{pysecrets.token_hex(8)}")
    payload = pysecrets.token_bytes(64)
    try:
        t0 = time.monotonic()
        store.put(key, payload)
        back = store.get(key)
        store.delete(key)
        ms = (time.monotonic() - t0) * 1000
        if back != payload:
            report.add("storage", "probe", FAIL, f"{where}: a probe object read back different bytes",
                       "the store corrupts data; do not use it")
        elif store.head(key) is not None:
            report.add("storage", "probe", FAIL, f"{where}: a deleted probe object is still there",
                       "the keys need s3:DeleteObject (prune and locks need it)")
        else:
            report.add("storage", "probe", OK, f"{where}: wrote, read back and deleted a probe object in {ms:.0f} ms")
    except DbopsError as e:
        report.add("storage", "probe", FAIL, f"{where}: probe object failed: {e.message}",
                   e.hint or "the keys need s3:PutObject, s3:GetObject, s3:DeleteObject and s3:ListBucket")
        return
    check_encryption(s, store, layout, report)
    from dbops.storage.probe import conditional_writes_refused

    try:
        if conditional_writes_refused(store, layout):
            report.add("storage", "conditional", OK, f"{where}: a second conditional put (If-None-Match) is refused")
        else:
            report.add("storage", "conditional", FAIL, f"{where} ignores conditional writes (If-None-Match: *)",
                       "dbops needs a store that honours If-None-Match (archived WAL is never overwritten, locks "
                       "and backups rely on it); check for a proxy or gateway that drops the header")
    except DbopsError as e:
        report.add("storage", "conditional", FAIL, f"{where}: conditional put probe failed: {e.message}", e.hint)
    try:
        server = store.server_time()
    except DbopsError:
        server = None
    if server is not None:
        skew = time.time() - server
        report.storage["clock_skew_seconds"] = round(skew, 1)
        if abs(skew) > 600:
            report.add("storage", "clock", FAIL, f"clock differs from the storage server's by {skew:.0f} s",
                       "synchronise this host's clock (NTP); S3 refuses requests signed more than 15 minutes off")
        elif abs(skew) > 30:
            report.add("storage", "clock", WARN, f"clock differs from the storage server's by {skew:.0f} s",
                       "synchronise this host's clock (NTP); restore targets are times")
        else:
            report.add("storage", "clock", OK, f"clock skew against the storage server {skew:+.1f} s")


def check_encryption(s, store, layout, report: CheckReport) -> None:
    """Whether the archive is encrypted (its identity object's header), and with which key ID."""
    enc = s.encryption
    key_id_of = getattr(store, "key_id_of", None)
    current = getattr(getattr(store, "keys", None), "current_id", None)
    info: dict = {"configured": enc.enabled, "key_id": current, "archive_encrypted": None, "archive_key_id": None}
    report.storage["encryption"] = info
    if key_id_of is None:
        return
    try:
        archive_kid = key_id_of(layout.identity())
    except NotFoundError:
        archive_kid = ""
    except DbopsError as e:
        report.add("storage", "encryption", FAIL, f"cannot read the archive's identity object: {e.message}", e.hint)
        return
    known = getattr(store.keys, "by_id", {})
    if archive_kid == "":
        report.add("storage", "encryption", OK if enc.enabled else WARN,
                   f"archive empty; new objects will be encrypted with key ID {current}" if enc.enabled
                   else "archive empty; objects will be stored unencrypted (storage.encryption not set)",
                   None if enc.enabled else "see docs/encryption.md to encrypt the archive")
        return
    info["archive_encrypted"] = archive_kid is not None
    info["archive_key_id"] = archive_kid
    if archive_kid is None:
        if enc.enabled and not enc.allow_plaintext:
            report.add("storage", "encryption", FAIL, "the archive is not encrypted but storage.encryption is set",
                       "set storage.encryption.allow_plaintext: true to migrate it, or check storage.prefix")
        elif enc.enabled:
            report.add("storage", "encryption", WARN, f"migrating: the archive holds unencrypted objects; "
                       f"new ones are encrypted with key ID {current}")
        else:
            report.add("storage", "encryption", WARN, "the archive is not encrypted: whoever reads the bucket "
                       "reads the database", "see docs/encryption.md")
    elif archive_kid not in known:
        report.add("storage", "encryption", FAIL,
                   f"the archive is encrypted with key ID {archive_kid}, which is not configured",
                   "configure that key (storage.encryption.key_file, or old_keys after a rotation)")
    else:
        how = f"with key ID {current}" if archive_kid == current else \
            f"with key ID {current} (identity object sealed with the older key ID {archive_kid})"
        report.add("storage", "encryption", OK, "archive encrypted (AES-256-GCM) " + how if current
                   else f"archive encrypted with key ID {archive_kid}; new objects are stored unencrypted (migration)")


# --------------------------------------------------------------------------- runtime


def _check_runtime(cfg: Config, report: CheckReport) -> None:
    try:
        from dbops import runtime as rtmod
    except ImportError:
        report.add("runtime", "container", WARN, "the throwaway-container runtime is not available in this build")
        return
    probe = getattr(rtmod, "probe", None)
    if probe is None:
        report.add("runtime", "container", WARN, "the throwaway-container runtime is not available in this build")
        return
    report.runtime = {"engine": cfg.runtime.engine, "image": cfg.runtime.image, "rootfs": cfg.runtime.rootfs}
    try:
        msg = probe(cfg.runtime)
        report.runtime["ok"] = True
        report.add("runtime", "container", OK, str(msg))
    except DbopsError as e:
        report.runtime["ok"] = False
        report.add("runtime", "container", FAIL, f"{cfg.runtime.engine}: {e.message}"
                   + (f" ({e.detail.strip().splitlines()[-1]})" if e.detail else ""),
                   e.hint or "backups validate in a throwaway container: fix the engine, or set runtime.engine: none")


def run_check(cfg: Config, *, nodes: bool = True, storage: bool = True, runtime: bool = True) -> CheckReport:
    report = CheckReport()
    if nodes:
        _check_nodes(cfg, report)
    if storage:
        _check_storage(cfg, report)
    if nodes and storage and report.storage.get("reachable"):
        from dbops.ops import check_tablespaces
        from dbops.ops.failover import poolerpause

        check_tablespaces.check(cfg, report)
        poolerpause.check(cfg, report)
    if runtime:
        _check_runtime(cfg, report)
        if report.runtime.get("ok"):
            from dbops.ops import localecheck

            primary = next((n for n in report.nodes if n.reachable and n.role == "primary"), None)
            localecheck.check(cfg, report, cfg.node(primary.name) if primary else None)
    return report
