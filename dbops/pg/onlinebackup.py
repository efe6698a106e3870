"""A non-exclusive base backup on one held connection (PostgreSQL's low-level backup API), and
the proof that a server's data folder is this host's to copy.

    with OnlineBackup(node, "dbops run ...") as b:     # connect, check, pg_backup_start(fast)
        copy(b.data_dir, ...)                           # the files, while the server runs on
        label, spcmap = b.stop()                        # pg_backup_stop() on the same connection

A non-exclusive backup belongs to its session: when the connection ends before ``stop()`` (an
error, a crash of dbops) PostgreSQL aborts it by itself, so nothing is left half open on the
server. Leaving the ``with`` block without ``stop()`` closes the connection for that reason.

:func:`local_data_dir` decides whether the data folder can be read here: the backend serving
the held connection must be a process of this host (``/proc/PID``) whose working directory (a
server process's data folder) holds a ``postmaster.pid`` naming its parent, with the system
identifier the server itself reports. A server in a container, on another host
or behind a proxy fails that proof, and the caller takes the backup over the replication
protocol instead (pg_basebackup).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

from dbops.config import Node
from dbops.errors import PostgresError, QueryError
from dbops.pg import conn as pgconn
from dbops.pg.lsn import parse_lsn

PROC = Path("/proc")


class NotLocal(Exception):
    """The source's data folder cannot be copied from this host, or its server refuses the backup
    functions to dbops' role (the reason is the message). Raised before any backup started."""


def _parent_pid(pid: int) -> int:
    stat = (PROC / str(pid) / "stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _system_identifier(data_dir: Path) -> int:
    """pg_control starts with the 64-bit system identifier (native byte order)."""
    with open(data_dir / "global" / "pg_control", "rb") as f:
        return struct.unpack("=Q", f.read(8))[0]


def local_data_dir(conn: pgconn.Connection, configured: str | None) -> Path:
    """The data folder of the server behind conn, proven to be on this host and readable; raises
    NotLocal with the reason otherwise."""
    backend, sysid = conn.execute(
        "SELECT pg_backend_pid(), (SELECT system_identifier FROM pg_control_system())::text").fetchone()
    try:
        data_dir = Path(os.readlink(PROC / str(backend) / "cwd"))
        postmaster = _parent_pid(int(backend))
    except (OSError, ValueError, IndexError) as e:
        raise NotLocal(f"the server's backend (pid {backend}) is not a process this host shows ({e})") from None
    try:
        pid_lines = (data_dir / "postmaster.pid").read_text().splitlines()
        on_disk_sysid = _system_identifier(data_dir)
    except OSError as e:
        raise NotLocal(f"cannot read the data folder {data_dir}: {e}") from None
    if len(pid_lines) < 2 or pid_lines[0].strip() != str(postmaster) or \
            os.path.realpath(pid_lines[1].strip()) != os.path.realpath(data_dir):
        raise NotLocal(f"{data_dir}/postmaster.pid does not name the server's postmaster (pid {postmaster})")
    if str(on_disk_sysid) != sysid:
        raise NotLocal(f"{data_dir} is not the data folder of the server dbops is connected to")
    if configured and os.path.realpath(configured) != os.path.realpath(data_dir):
        raise NotLocal(f"the server runs on {data_dir}, not on the configured data_dir {configured}")
    if not os.access(data_dir / "global" / "pg_control", os.R_OK):
        raise NotLocal(f"{data_dir} is not readable by this process")
    return data_dir


class OnlineBackup:
    """pg_backup_start(label, fast) on a held connection; stop() ends it on the same one."""

    def __init__(self, node: Node, label: str) -> None:
        self.node = node
        self.label = label
        self.conn: pgconn.Connection | None = None
        self.data_dir: Path | None = None
        self.start_lsn = 0
        self.catalog_version = 0
        self.version = 0
        self.stopped = False

    def __enter__(self) -> OnlineBackup:
        self.conn = pgconn.connect(self.node, connect_timeout=10)
        try:
            self.version, in_recovery, self.catalog_version = self.conn.execute(
                "SELECT current_setting('server_version_num')::int, pg_is_in_recovery(), "
                "(SELECT catalog_version_no FROM pg_control_system())").fetchone()
            if in_recovery:  # from a standby the backup ends at minRecoveryPoint: pg_basebackup handles that
                raise NotLocal("the source is a standby")
            # The connection idles while the files are copied, and the start's checkpoint may take long:
            # a role's or the server's timeouts must not end the session (that would abort the backup).
            self.conn.execute("SET statement_timeout = 0")
            if self.version >= 140000:
                self.conn.execute("SET idle_session_timeout = 0")
            self.data_dir = local_data_dir(self.conn, self.node.data_dir)
            start = "pg_backup_start(%s, true)" if self.version >= 150000 else "pg_start_backup(%s, true, false)"
            self.start_lsn = parse_lsn(pgconn.scalar(self.conn, f"SELECT {start}::text", (self.label,)))
        except QueryError as e:  # a role without the rights (pg_basebackup needs only REPLICATION)
            self.conn.close()
            raise NotLocal(f"the server refused the low-level backup functions: {e.detail or e.message}") from None
        except BaseException:
            self.conn.close()
            raise
        return self

    @property
    def tablespace_dir(self) -> str:
        """The folder a tablespace's location holds for this server version (TABLESPACE_VERSION_DIRECTORY)."""
        return f"PG_{self.version // 10000}_{self.catalog_version}"

    def stop(self) -> tuple[str, str]:
        """End the backup; (backup_label, tablespace_map) as the server wrote them. The WAL up to the
        end is not waited for here: the caller waits for its own, later target to be archived."""
        assert self.conn is not None
        stop = "pg_backup_stop(false)" if self.version >= 150000 else "pg_stop_backup(false, false)"
        try:
            lsn, label, spcmap = self.conn.execute(f"SELECT lsn::text, labelfile, spcmapfile FROM {stop}").fetchone()
        except PostgresError as e:
            e.message = f"pg_backup_stop on {self.node.name} failed: {e.message}"
            raise
        self.stopped = True
        return label, spcmap or ""

    def __exit__(self, *exc: Any) -> None:
        assert self.conn is not None
        self.conn.close()  # without stop(): the server aborts the backup as the session ends
