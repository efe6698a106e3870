"""What the concrete throwaway instances share: waiting for readiness, and removal however a block ends."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from dbops import log
from dbops.config import Node
from dbops.errors import PostgresError
from dbops.runtime.base import InstanceSpec, safe_name

_log = log.get("runtime")

# postmaster.pid line 8: the postmaster's status once it accepts connections (what pg_ctl -w reads).
_PID_STATUS_LINE = 7
_READY_STATUSES = ("ready", "standby")
READY_POLL = 0.05  # the pid file and a libpq ping: cheap
READY_ALIVE_INTERVAL = 1.0


def pid_file_status(data_dir: Path) -> str | None:
    """The status word in data_dir/postmaster.pid ('starting', 'ready', 'standby', 'stopping'), if any."""
    try:
        lines = (Path(data_dir) / "postmaster.pid").read_text().splitlines()
    except (FileNotFoundError, PermissionError):
        return None
    return lines[_PID_STATUS_LINE].strip() if len(lines) > _PID_STATUS_LINE else None


class InstanceBase:
    """What the concrete instances share: waiting for readiness, and removal however a block ends."""

    host: str
    port: int
    spec: InstanceSpec
    db_user: str

    def is_running(self) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    def logs(self, tail: int = 50) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def ended_by(self) -> str | None:
        return None

    def remove(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Wait until the server accepts connections (in hot standby, once it is consistent).

        Ready means: this data folder's postmaster.pid says 'ready' or 'standby' (so another server
        on the same port cannot fool us) and the port answers. Raises PostgresError with the tail
        of the server log when the server exits first or the timeout passes. A server whose
        ``recovery_target_action`` is 'shutdown' exits instead of becoming ready: read its
        control data rather than calling this.
        """
        from dbops.pg.conn import ping

        deadline = time.monotonic() + timeout
        # Just started: the first look at the process (for a container, an engine call of 0.05 s on
        # the serial path) waits a check interval; a server that exits sooner is seen then.
        next_alive_check = time.monotonic() + READY_ALIVE_INTERVAL
        while True:
            if pid_file_status(self.spec.data_dir) in _READY_STATUSES and ping(self.host, self.port):
                log.event(_log, logging.INFO, "instance ready", name=self.spec.name, port=self.port)
                return
            now = time.monotonic()
            # is_running may ask a container engine (a process of its own): not at every poll
            if (now >= next_alive_check or now >= deadline) and not self.is_running():
                raise PostgresError(
                    f"PostgreSQL ({self.spec.name}) exited before accepting connections",
                    detail=self.logs(40).strip() or "(no server log)",
                    hint="the server log above says why (missing WAL, a setting, a damaged data folder)",
                )
            if time.monotonic() >= deadline:
                raise PostgresError(
                    f"PostgreSQL ({self.spec.name}) did not accept connections within {timeout:.0f} s",
                    detail=self.logs(40).strip() or "(no server log)",
                    hint="recovery may need longer (raise the start timeout) or wait for WAL that is not there",
                )
            if now >= next_alive_check:
                next_alive_check = now + READY_ALIVE_INTERVAL
            time.sleep(READY_POLL)

    def node(self, dbname: str = "postgres") -> Node:
        """A config Node for this instance, for dbops.pg.conn (user: the runtime's database role)."""
        return Node(name=safe_name(self.spec.name)[:63] or "instance", host=self.host, port=self.port,
                    user=self.db_user, dbname=dbname)

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb) -> None:
        try:
            self.remove()
        except Exception as e:  # never mask the exception that ended the block
            if et is None:
                raise
            _log.warning("could not remove instance: %s", e)

