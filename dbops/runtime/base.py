"""What every runtime shares: the instance spec, the Instance/Runtime protocols, the data folder's owner.

A *throwaway instance* is PostgreSQL started on a scratch data folder (a restored backup) to
replay WAL, be checked, and be stopped cleanly again. Where it runs is the runtime's business
(a container, or a plain local process); what it runs with is decided here, once:

* the server listens on no TCP address at all: only on a Unix socket in its run folder (mode
  0700, owned by the server's OS user; a short private folder under the temp folder when that
  path would be too long for a socket), so no other local user can reach a copy of production;
* ``archive_mode=off`` and ``primary_conninfo=''`` by default, so a copy of production never
  pushes WAL into the production archive nor streams from the production primary;
* ``restore_command`` copies from the read-only WAL folder (``cp /wal/%f "%p"`` in a
  container): the host fetches the WAL the instance needs into that folder ahead of time,
  so the server's environment needs nothing but ``cp`` (a stock ``postgres:15`` image works).
  With ``wal_linked`` the host has also hard-linked those files into the data folder's
  ``pg_wal`` (``link_wal``), and ``restore_command`` declines what is already there, so recovery
  reads it in place: no 16 MiB copy per segment (measured: 20 ms each, a third of the replay);
* with ``trust_local`` (the default) a generated ``pg_hba.conf`` admits connections on that
  socket without a password (dbops owns no password for a restored cluster) and nothing else;
* the server runs with a minimal environment (``PATH``, ``LANG``, ``LC_ALL``): nothing of
  dbops' own environment (S3 keys, ``PGPASSWORD``) is visible to it;
* a data folder without ``postgresql.conf`` (Debian keeps it in /etc) gets an empty one, so the
  server starts on built-in defaults plus the ``-c`` settings;
* ``logging_collector=off``: the server log goes to stderr, which the runtime keeps
  (``Instance.logs``).

Settings given on the command line (``-c k=v``) win over ``postgresql.conf`` and
``postgresql.auto.conf`` alike, so the caller's settings hold whatever the backup carries.

The settings and generated files: :mod:`dbops.runtime.serverconf`; waiting for readiness and
removal however a block ends: :mod:`dbops.runtime.instance`.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Mapping, Protocol, Sequence

from dbops import proc
from dbops.config import Node
from dbops.errors import DbopsError, UsageError

# Paths as a containerised server sees them.
DATA_PATH = "/data"
WAL_PATH = "/wal"
RUN_PATH = "/dbops-run"
SOCKET_PATH = "/dbops-sock"
MINIMAL_ENV: Mapping[str, str] = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                                  "LANG": "C", "LC_ALL": "C"}

LOOPBACK = "127.0.0.1"

# Settings the runtime decides; a spec may not set them.
OWNED_SETTINGS = frozenset({
    "port", "listen_addresses", "unix_socket_directories", "unix_socket_permissions", "unix_socket_group",
    "logging_collector", "log_destination",
    "hba_file", "ident_file", "config_file", "data_directory",
})


@dataclass(frozen=True)
class InstanceSpec:
    """A PostgreSQL server to start on a scratch data folder.

    data_dir  host folder with the cluster (owned by the OS user the server must run as, mode 0700)
    port      loopback TCP port the host connects to (pick a free one)
    wal_dir   host folder of WAL segments / history files for ``restore_command``; mounted read-only
              at ``/wal`` in a container. ``restore_command`` is set to copy from it unless
              ``settings`` sets its own.
    settings  extra server settings, passed as ``-c k=v`` (recovery targets, hot_standby, ...);
              they show in process listings and ``inspect``: never a secret
    name      a short label for this run (container name, log lines)
    run_dir   host folder for the generated configuration files and the local server log;
              default: a private folder created next to ``data_dir`` and removed with the instance
    trust_local  admit loopback connections without a password (a generated ``pg_hba.conf``)
    mounts    (host folder, path the server sees it at) pairs, read-write: tablespace folders. A
              container mounts each at its path; a local server sees host folders where they are,
              and a folder that must appear at another path (a tablespace created during replay,
              whose recorded location may be a live folder on this host) gets a private mount
              namespace (root only)
    wal_linked  every file of ``wal_dir`` is also hard-linked into ``data_dir/pg_wal`` (``link_wal``):
              ``restore_command`` then fails ("not found") for a file that is there, and PostgreSQL
              reads it from pg_wal, as it does with any file its restore_command does not supply
    """

    data_dir: Path
    port: int
    wal_dir: Path | None = None
    settings: Mapping[str, str] = field(default_factory=dict)
    name: str = "instance"
    run_dir: Path | None = None
    trust_local: bool = True
    mounts: tuple[tuple[str, str], ...] = ()
    wal_linked: bool = False

    def __post_init__(self) -> None:
        bad = sorted(OWNED_SETTINGS & set(self.settings))
        if bad:
            raise UsageError(
                f"setting {', '.join(bad)} is decided by the runtime and cannot be set for an instance",
                hint="use the spec's port; the server always listens on loopback only",
            )
        if not 0 < self.port < 65536:
            raise UsageError(f"invalid port {self.port}")


class Instance(Protocol):
    """A started server. Use it as a context manager: it is removed however the block ends
    (exceptions and Ctrl-C included). A process killed outright leaves a container behind
    until the next container run on this host (see ``container.cleanup_stale``)."""

    host: str  # where the host connects: the folder holding the server's Unix socket
    port: int
    spec: InstanceSpec
    data_path: str  # the data folder as the server and run_tool see it (/data in a container)
    wal_path: str | None  # the WAL folder as the server sees it (/wal in a container)
    run_dir: Path  # host folder with the generated configuration files (and the local server log)

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Until it accepts connections (a standby: once consistent, which needs hot_standby=on)."""
        ...

    def is_running(self) -> bool: ...

    def logs(self, tail: int = 50) -> str:
        """The last lines of the server log (for error messages)."""
        ...

    def ended_by(self) -> str | None:
        """How the host ended the server, when it did (the OOM killer, SIGKILL); None otherwise or while
        it runs. The server log cannot say so when its postmaster itself was killed."""
        ...

    def stop(self, mode: str = "fast", timeout: float = 600.0) -> None:
        """Clean shutdown; a server in recovery is left "shut down in recovery" (a consistent snapshot)."""
        ...

    def run_tool(self, argv: Sequence[str], *, timeout: float | None = 600, check: bool = True,
                 env: Mapping[str, str] | None = None, reads: Sequence[Path] = (),
                 cancel: threading.Event | None = None) -> proc.Result:
        """Run a PostgreSQL client/tool where the server runs (PGHOST/PGPORT/PGUSER/PGDATA set).
        ``reads``: host folders the tool reads besides the instance's, seen at their own path
        (mounted read-only into a one-shot container; a local tool sees them where they are).
        ``cancel``: once set, the tool is stopped (a one-shot container removed) and
        :class:`dbops.proc.Cancelled` raised."""
        ...

    def remove(self) -> None:
        """Kill the server if it still runs and remove what start() made. Idempotent."""
        ...

    def node(self, dbname: str = "postgres") -> Node: ...
    def __enter__(self) -> "Instance": ...
    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None: ...


class Runtime(Protocol):
    """Starts throwaway instances. ``engine`` names it ('podman', 'docker', 'none')."""

    engine: str

    def start(self, spec: InstanceSpec) -> Instance:
        """Start the server (not waiting for it: see ``Instance.wait_ready``)."""
        ...


STOP_MODES = ("smart", "fast", "immediate")


def check_stop_mode(mode: str) -> str:
    if mode not in STOP_MODES:
        raise UsageError(f"unknown stop mode {mode!r}", hint="one of " + ", ".join(STOP_MODES))
    return mode


@dataclass(frozen=True)
class Owner:
    """The OS user that owns a data folder: the server must run as it."""

    uid: int
    gid: int

    @classmethod
    def of(cls, path: Path) -> "Owner":
        try:
            st = path.stat()
        except FileNotFoundError:
            raise DbopsError(f"data folder {path} does not exist") from None
        if st.st_uid == 0:
            raise DbopsError(
                f"data folder {path} is owned by root",
                hint="PostgreSQL refuses to run as root: chown the folder to the postgres OS user",
            )
        return cls(st.st_uid, st.st_gid)

    @property
    def user_name(self) -> str:
        import pwd

        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            raise DbopsError(f"no OS user with uid {self.uid} (owner of the data folder)") from None

    def chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            os.chown(path, self.uid, self.gid)


def safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_.-" else "-" for ch in name)
