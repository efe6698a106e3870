"""A lab for switchover measurements: PgBouncer in front of a `dbops lab`, and the config that names it.

    bouncer = start_pgbouncer(dir, lab)            # Debian's pgbouncer as the postgres OS user
    cfg_path = failover_config(lab, bouncer)       # the lab's dbops.yaml plus failover.pgbouncer
    bouncer.stop()

PgBouncer runs in transaction pooling mode with database ``appdb`` pointing at the lab's
primary; clients connect without a password (auth_type trust on loopback) and PgBouncer
authenticates to PostgreSQL with the lab's password from its userlist file (mode 0600).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dbops import proc

DATABASE = "appdb"
ADMIN_USER = "pgbouncer"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lab_password(lab: Any) -> str:
    return (Path(lab.dir) / "pgpass").read_text().splitlines()[0].rsplit(":", 1)[1]


@dataclass
class Bouncer:
    dir: Path
    port: int
    ini: Path
    pid: int

    def conninfo(self, user: str = "postgres") -> str:
        return (f"host=127.0.0.1 port={self.port} user={user} dbname={DATABASE} connect_timeout=5 "
                "application_name=writer_probe")

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        for _ in range(100):
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        os.kill(self.pid, signal.SIGKILL)


def start_pgbouncer(d: Path, lab: Any) -> Bouncer:
    """Start PgBouncer under d (as the postgres OS user), pointing appdb at the lab's primary."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o755)
    port = _free_port()
    p = lab.primary
    ini = d / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n"
        f"{DATABASE} = host={p.host} port={p.port} dbname=postgres\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {d / 'userlist.txt'}\n"
        f"admin_users = {ADMIN_USER}\n"
        "pool_mode = transaction\n"
        "server_connect_timeout = 2\n"
        "server_login_retry = 0\n"
        f"logfile = {d / 'pgbouncer.log'}\n"
        f"pidfile = {d / 'pgbouncer.pid'}\n"
    )
    users = d / "userlist.txt"
    users.write_text(f'"postgres" "{_lab_password(lab)}"\n"{ADMIN_USER}" ""\n')
    os.chmod(users, 0o600)
    if os.geteuid() == 0:
        shutil.chown(d, "postgres")
        for f in (ini, users):
            shutil.chown(f, "postgres")
    proc.run([shutil.which("pgbouncer") or "/usr/sbin/pgbouncer", "-d", str(ini)], user="postgres", timeout=30)
    pidfile = d / "pgbouncer.pid"
    for _ in range(100):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        time.sleep(0.05)
    pid = int(pidfile.read_text().strip())
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    return Bouncer(d, port, ini, pid)


def kill9(data_dir: str | Path) -> list[int]:
    """kill -9 a PostgreSQL server and every process it started (as a dying host would); returns the pids."""
    data_dir = Path(data_dir)
    try:
        postmaster = int((data_dir / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return []
    pids = [postmaster]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == postmaster:  # ppid
            pids.append(int(stat.parent.name))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10  # SIGKILL is delivered asynchronously: wait until they are gone
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.005)
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def make_unreachable(data_dir: str | Path) -> None:
    """The data folder can no longer be read by its owner (a dead disk, an unreachable host)."""
    os.chmod(data_dir, 0)


def make_reachable(data_dir: str | Path) -> None:
    os.chmod(data_dir, 0o700)


# A fence hook that succeeds only when nothing answers on the old primary's port any more.
FENCE_CHECK_HOOK = "sh -c '! pg_isready -q -t 2 -h \"$DBOPS_OLD_PRIMARY_HOST\" -p \"$DBOPS_OLD_PRIMARY_PORT\"'"


def failover_config(lab: Any, bouncer: Bouncer | None = None, *, extra: dict | None = None,
                    name: str = "dbops-failover.yaml") -> str:
    """Write the lab's configuration plus a failover section (PgBouncer, hooks, ...); returns its path."""
    raw = yaml.safe_load(Path(lab.config_path).read_text())
    fo: dict[str, Any] = dict(extra or {})
    if bouncer is not None:
        fo["pgbouncer"] = {"host": "127.0.0.1", "port": bouncer.port, "user": ADMIN_USER,
                           "config_file": str(bouncer.ini), "databases": [DATABASE]}
    raw["failover"] = fo
    path = Path(lab.dir) / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)
