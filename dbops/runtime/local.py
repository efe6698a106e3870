"""Engine ``none``: the throwaway server is a plain local process on this host.

The server runs as the OS user that owns the data folder (``runuser`` when dbops runs as
root), listens only on a Unix socket in its private run folder, with a minimal environment, and
logs to ``postgres.log`` in the run folder. It is started as
a direct child (``postgres -D ...``) rather than through ``pg_ctl start``: ``pg_ctl start -W``
hands back no process to watch, so a server that dies during start-up would look like one
that has not written its pid file yet. It is stopped with ``pg_ctl stop -m MODE``, which
leaves a server that was in recovery "shut down in recovery".
"""

from __future__ import annotations

import logging
import os
import threading
import subprocess
from pathlib import Path
from typing import Mapping, Sequence

from dbops import log, proc
from dbops.errors import CommandError, PostgresError
from dbops.pg import binaries
from dbops.runtime import mountns
from dbops.runtime.base import MINIMAL_ENV, InstanceSpec, Owner, check_stop_mode
from dbops.runtime.instance import InstanceBase
from dbops.runtime.serverconf import prepare_run_dir, remove_run_dir, server_settings, setting_args, socket_dir

_log = log.get("runtime.local")

LOG_FILE = "postgres.log"


class LocalRuntime:
    """Starts throwaway servers as local processes, with the binaries of ``bin_dir`` (or located)."""

    engine = "none"

    def __init__(self, *, bin_dir: str | None = None, db_user: str = "postgres") -> None:
        self.bin_dir = bin_dir
        self.db_user = db_user

    def start(self, spec: InstanceSpec) -> "LocalInstance":
        owner = Owner.of(Path(spec.data_dir))
        moved = mountns.moved(spec.mounts)
        points = mountns.prepare(moved)
        run_dir, created = prepare_run_dir(spec, owner)
        sock, sock_created = run_dir, False
        try:
            sock, sock_created = socket_dir(run_dir, owner)
            wal_path = str(Path(spec.wal_dir).resolve()) if spec.wal_dir is not None else None
            settings = server_settings(spec, run_dir, wal_path=wal_path, run_path=str(run_dir), owner=owner,
                                       socket_path=str(sock))
            log_path = run_dir / LOG_FILE
            argv = [binaries.binary("postgres", self.bin_dir), "-D", str(spec.data_dir), *setting_args(settings)]
            user: str | None = owner.user_name
            if moved:  # tablespaces created during replay: their recorded locations become private mounts
                argv, user = mountns.wrap(argv, moved, owner.user_name), None
            with open(log_path, "ab") as logf:
                owner.chown(log_path)
                popen = proc.spawn(argv, user=user, stdout=logf, stderr=subprocess.STDOUT, env=MINIMAL_ENV,
                                   inherit_env=False)
        except BaseException:
            remove_run_dir(run_dir, created, sock, sock_created)
            mountns.cleanup(points)
            raise
        log.event(_log, logging.INFO, "local instance started", name=spec.name, port=spec.port, pid=popen.pid,
                  private_mounts=len(moved))
        inst = LocalInstance(spec, owner, run_dir, created, popen, self.bin_dir, self.db_user, (sock, sock_created))
        inst.mount_points = points
        return inst


class LocalInstance(InstanceBase):
    def __init__(self, spec: InstanceSpec, owner: Owner, run_dir: Path, created: bool,
                 popen: subprocess.Popen, bin_dir: str | None, db_user: str, sock: tuple[Path, bool]) -> None:
        self.spec = spec
        self.host = str(sock[0])  # the folder of the server's Unix socket
        self._sock_created = sock[1]
        self.port = spec.port
        self.data_path = str(spec.data_dir)
        self.wal_path = str(Path(spec.wal_dir).resolve()) if spec.wal_dir is not None else None
        self.db_user = db_user
        self.run_dir = run_dir
        self._created = created
        self._owner = owner
        self._popen = popen
        self._bin_dir = bin_dir
        self._removed = False
        self.mount_points: list[Path] = []  # created for private mounts; removed with the instance

    @property
    def log_file(self) -> Path:
        return self.run_dir / LOG_FILE

    def is_running(self) -> bool:
        return self._popen.poll() is None

    def ended_by(self) -> str | None:
        if self._popen.poll() == -9:
            return f"the server (pid {self._popen.pid}) was terminated by signal 9"
        return None

    def logs(self, tail: int = 50) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-tail:]) + ("\n" if lines else "")

    def stop(self, mode: str = "fast", timeout: float = 600.0) -> None:
        """Shut the server down cleanly (``pg_ctl stop -m MODE``) and wait for it to exit.

        pg_ctl only signals it (``-W``): the server is this process's child, so its exit is
        waited for directly rather than by pg_ctl's polling of the pid file every 0.1 s. The server
        removes its pid file before it exits, after the shutdown checkpoint."""
        check_stop_mode(mode)
        if not self.is_running():
            return
        try:
            proc.run([self._pg_ctl(), "stop", "-D", str(self.spec.data_dir), "-m", mode, "-W"],
                     user=self._owner.user_name, timeout=60, what="pg_ctl stop")
            self._popen.wait(timeout=timeout)
        except (CommandError, subprocess.TimeoutExpired) as e:
            raise PostgresError(
                f"PostgreSQL ({self.spec.name}) did not stop ({mode}) within {timeout:.0f} s",
                detail=(getattr(e, "detail", None) or "") + "\n" + self.logs(20),
                hint="it is still running; remove() stops it immediately",
            ) from None
        log.event(_log, logging.INFO, "local instance stopped", name=self.spec.name, mode=mode,
                  status=self._popen.returncode)

    def run_tool(self, argv: Sequence[str], *, timeout: float | None = 600, check: bool = True,
                 env: Mapping[str, str] | None = None, reads: Sequence[Path] = (),
                 cancel: threading.Event | None = None) -> proc.Result:
        """Run a PostgreSQL client or tool on this host as the data folder's owner.

        A bare program name is taken from the PostgreSQL bin folder when it is there. PGHOST,
        PGPORT, PGUSER and PGDATA point at this instance. ``reads``: seen where they are.
        """
        argv = list(argv)
        candidate = os.path.join(binaries.bindir(self._bin_dir), argv[0])
        if os.sep not in argv[0] and os.path.isfile(candidate):
            argv[0] = candidate
        tool_env = {**MINIMAL_ENV, "PGHOST": self.host, "PGPORT": str(self.port), "PGUSER": self.db_user,
                    "PGDATA": self.data_path, **(env or {})}
        return proc.run(argv, user=self._owner.user_name, env=tool_env, inherit_env=False, timeout=timeout,
                        check=check, cancel=cancel)

    def remove(self) -> None:
        """Stop the server at once if it still runs (immediate mode, then SIGKILL), and forget it."""
        if self._removed:
            return
        if self.is_running():
            proc.run([self._pg_ctl(), "stop", "-D", str(self.spec.data_dir), "-m", "immediate", "-w", "-t", "30"],
                     user=self._owner.user_name, timeout=60, check=False, what="pg_ctl stop")
            if self.is_running():
                proc.stop(self._popen)
        remove_run_dir(self.run_dir, self._created, Path(self.host), self._sock_created)
        mountns.cleanup(self.mount_points)
        self._removed = True

    def _pg_ctl(self) -> str:
        return binaries.binary("pg_ctl", self._bin_dir)
