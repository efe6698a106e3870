"""The lab's PostgreSQL servers: a primary made with initdb, replicas with pg_basebackup, run with
pg_ctl as the PostgreSQL OS user."""

from __future__ import annotations

import time
from pathlib import Path

from dbops import proc
from dbops.config import Node
from dbops.errors import DbopsError
from dbops.lab import common
from dbops.pg import binaries


DEFAULT_PG_PORT = 15432


def pg_conf(port: int, run_dir: Path, archive_cmd: str, restore_cmd: str) -> str:
    return f"""
# --- dbops lab ---
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{run_dir}'
max_connections = 60
shared_buffers = 64MB
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
wal_keep_size = 256MB
hot_standby = on
hot_standby_feedback = on
wal_log_hints = on
archive_mode = on
archive_command = '{archive_cmd}'
archive_timeout = 0
restore_command = '{restore_cmd}'
recovery_target_timeline = 'latest'
logging_collector = off
log_line_prefix = '%m [%p] '
log_checkpoints = on
"""


def pg_ctl(data: Path, *args: str, timeout: float = 120) -> proc.Result:
    return proc.run([binaries.binary("pg_ctl"), "-D", str(data), *args], user=common.run_user(), timeout=timeout)


def pg_running(data: Path) -> bool:
    pidfile = data / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return False
    return proc.pid_alive(pid)


def start_pg(data: Path, logfile: Path) -> None:
    if pg_running(data):
        return
    pg_ctl(data, "-l", str(logfile), "-w", "-t", "120", "start", timeout=150)


def node(name: str, port: int, d: Path) -> Node:
    return Node(name=name, host="127.0.0.1", port=port, user=common.PG_USER, dbname="postgres",
                passfile=str(d / "pgpass"), data_dir=str(d / "pg" / name), controller="local", os_user=common.PG_USER)


def init_primary(d: Path, name: str, port: int, password: str, archive_cmd: str, restore_cmd: str) -> None:
    data = d / "pg" / name
    pwfile = d / "run" / "initdb-pw"
    common.write_private(pwfile, password + "\n")
    try:
        proc.run([binaries.binary("initdb"), "-D", str(data), "-U", common.PG_USER, "--data-checksums",
                  "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", f"--pwfile={pwfile}",
                  "--encoding=UTF8", "--locale=C"], user=common.run_user(), timeout=180)
    finally:
        pwfile.unlink(missing_ok=True)
    with open(data / "postgresql.conf", "a") as f:
        f.write(pg_conf(port, d / "run", archive_cmd, restore_cmd))
    with open(data / "pg_hba.conf", "a") as f:
        f.write("host replication all 127.0.0.1/32 scram-sha-256\n")


def tablespace_mapping(d: Path, name: str, primary: Node) -> list[str]:
    """A replica on the same host keeps each tablespace of the primary in its own folder,
    tblspc/<replica>/<OID> in the lab (two servers must never share one)."""
    from dbops.ops.backup.tablespaces import query

    out = []
    for t in query(primary):
        folder = d / "tblspc" / name / str(t.oid)
        folder.mkdir(parents=True, exist_ok=True)
        for p in (folder.parent.parent, folder.parent, folder):
            proc.chown_to(p, common.PG_USER)
        out.append(f"--tablespace-mapping={t.location}={folder}")
    return out


def init_replica(d: Path, name: str, primary: Node, port: int) -> None:
    data = d / "pg" / name
    slot = f"slot_{name}"
    env = {"PGPASSFILE": str(d / "pgpass")}
    proc.run([binaries.binary("pg_basebackup"), "-h", primary.host, "-p", str(primary.port), "-U", common.PG_USER,
              "-D", str(data), "-X", "stream", "-R", "-C", "-S", slot, "--checkpoint=fast", "-w",
              *tablespace_mapping(d, name, primary)], user=common.run_user(), env=env, timeout=600)
    auto = data / "postgresql.auto.conf"
    text = auto.read_text()
    with open(auto, "a") as f:
        f.write(f"port = {port}\n")
        if "primary_slot_name" not in text:
            f.write(f"primary_slot_name = '{slot}'\n")


def wait_streaming(node: Node, timeout: float = 60.0) -> None:
    """Block until a replica's WAL receiver streams (pg_ctl -w returns before it connects)."""
    from dbops.pg import conn as pgconn

    deadline = time.monotonic() + timeout
    last = "no WAL receiver yet"
    while time.monotonic() < deadline:
        try:
            with pgconn.session(node) as c:
                if not pgconn.scalar(c, "SELECT pg_is_in_recovery()"):
                    return  # promoted earlier (a failover in this lab): nothing to wait for
                status = pgconn.scalar(c, "SELECT status FROM pg_stat_wal_receiver")
            if status == "streaming":
                return
            last = f"WAL receiver {status}"
        except DbopsError as e:
            last = e.message
        time.sleep(0.1)
    raise DbopsError(f"replica {node.name} is not streaming after {timeout:.0f} s ({last})",
                     hint=f"see logs/{node.name}.log in the lab folder")
