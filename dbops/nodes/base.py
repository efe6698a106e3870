"""The implementation every node controller shares (the protocol is :mod:`dbops.nodes.protocol`).

A controller operates one PostgreSQL node's server process and data folder: start,
stop, promote, read the control file, turn the node into a standby, rewind it.
Where the node lives is the subclass's business: it only supplies
:meth:`ShellController._exec` (run an argv as the data folder's owner, on the node)
and :meth:`ShellController._bin` (where the node's PostgreSQL binaries are).

Rules every controller keeps:

* argv lists only; a remote command line is built with ``shlex.join``;
* secrets never in argv: environment values travel in the process environment
  (local, container) or on stdin (ssh), never on a command line;
* waiting is done by short polls on the node itself (20 ms), not by pg_ctl's
  100 ms loop, because a switchover's write downtime is counted in milliseconds.
"""

from __future__ import annotations

import contextlib
import shlex
import time
from collections.abc import Mapping, Sequence

from dbops import log, proc
from dbops.config import Node
from dbops.errors import (
    CommandError,
    ConfigError,
    DbopsError,
    PostgresError,
    UsageError,
)
from dbops.nodes.protocol import STOP_MODES, Fence, RunState
from dbops.pg import autoconf as pgconf
from dbops.pg import controldata as cdmod
from dbops.pg.controldata import ControlData

_log = log.get("nodes")

POLL_SECONDS = 0.02
AUTO_CONF = "postgresql.auto.conf"
STANDBY_SIGNAL = "standby.signal"
RECOVERY_SIGNAL = "recovery.signal"

# Stop without pg_ctl's 100 ms wait loop: send the signal (pg_ctl -W), then poll for
# the pid file to go away (the postmaster removes it as its very last act).
_STOP_SH = (
    'pidfile="$2/postmaster.pid"; [ -f "$pidfile" ] || exit 0; '
    '"$1" stop -D "$2" -m "$3" -W -s || [ ! -f "$pidfile" ] || exit 1; '
    'while [ -f "$pidfile" ]; do sleep "$4"; done'
)
# Ask for a stop, then print pg_controldata as soon as the control file says "shut down": the
# shutdown checkpoint is on disk and the server writes no more WAL, while the postmaster may
# still be archiving its last segment and waiting for its walsenders (that can take longer).
_FENCE_SH = (
    'pidfile="$2/postmaster.pid"; '
    'if [ -f "$pidfile" ]; then "$1" stop -D "$2" -m "$3" -W -s || [ ! -f "$pidfile" ] || exit 1; fi; '
    'while :; do '
    'out=$(LANG=C LC_ALL=C "$4" -D "$2" 2>&1); '
    'if printf "%s\\n" "$out" | grep -Eq "^Database cluster state: +shut down$" '
    '&& ! printf "%s\\n" "$out" | grep -q CRC; then printf "%s\\n" "$out"; exit 0; fi; '
    'if [ ! -f "$pidfile" ]; then printf "%s\\n" "$out"; exit 0; fi; '
    'sleep "$5"; done'
)
# Remove a postmaster.pid no live postmaster of this folder holds (a crash left it; its pid may belong to
# another process by now, which pg_ctl would signal). Every postgres process's working directory is its
# data folder. Without /proc nothing is removed.
_STALE_PID_SH = (
    'pidfile="$1/postmaster.pid"; [ -f "$pidfile" ] || exit 0; [ -d /proc/self ] || exit 0; '
    'pid=$(head -n 1 "$pidfile" 2>/dev/null) || exit 0; dir=$(cd "$1" && pwd -P) || exit 0; '
    'if [ -n "$pid" ] && [ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$dir" ]; then exit 0; fi; '
    'rm -f "$pidfile" && echo "removed stale postmaster.pid (pid $pid)"'
)
# Atomic replace of a file in the data folder, content on stdin.
_WRITE_SH = 'umask 077; cat > "$1.dbops-tmp" && mv -f "$1.dbops-tmp" "$1"'


def _cat_or(gone: str) -> str:
    """Shell: print "$f"; when it was removed between the caller's test and the read (an exiting
    postmaster removes its postmaster.pid), run `gone` instead. Any other failure keeps cat's message
    and fails."""
    return ('{ { e=$(cat "$f" 2>&1 >&3); } 3>&1 || { [ ! -e "$f" ] && ' + gone + '; } || '
            '{ printf "%s\\n" "$e" >&2; false; }; }')


# Fence a stopped (or still exiting) former primary: the new postgresql.auto.conf from stdin, no
# recovery.signal, a standby.signal, all fsynced; then print postmaster.pid (empty when there is none).
_FENCE_STANDBY_SH = (
    'umask 077; cat > "$1/postgresql.auto.conf.dbops-tmp" && sync "$1/postgresql.auto.conf.dbops-tmp" && '
    'mv -f "$1/postgresql.auto.conf.dbops-tmp" "$1/postgresql.auto.conf" && rm -f "$1/recovery.signal" && '
    ': > "$1/standby.signal" && sync "$1/standby.signal" "$1/postgresql.auto.conf" "$1" && '
    '{ f="$1/postmaster.pid"; [ ! -f "$f" ] || ' + _cat_or("true") + '; }'
)
# Print a file, or exit 3 when it does not exist (also when it is removed between the test and the read).
_READ_SH = 'f="$1"; [ -f "$f" ] || exit 3; ' + _cat_or("exit 3")
# On a node whose binaries are not configured: the bin folder matching the data folder's major version.
_FIND_BIN_SH = (
    'v=$(cat "$1/PG_VERSION" 2>/dev/null); '
    'for d in "/usr/lib/postgresql/$v/bin" "/usr/pgsql-$v/bin" "$(pg_config --bindir 2>/dev/null)" '
    '"$(dirname "$(command -v pg_ctl 2>/dev/null)" 2>/dev/null)"; do '
    '[ -n "$d" ] && [ -x "$d/pg_ctl" ] && { echo "$d"; exit 0; }; done; exit 1'
)
# Programs every controller runs by name (found on the node's PATH).
PLAIN_PROGRAMS = frozenset({"sh", "rm", "test", "mkdir", "cat"})
POSTMASTER_PID = "postmaster.pid"


def postmaster_identity(pid_file: str | None) -> str | None:
    """Which postmaster a postmaster.pid names: its pid and start time (lines 1 and 3), or None.

    A container's postmaster is always pid 1; the start time tells two of them apart.
    """
    if not pid_file:
        return None
    lines = pid_file.splitlines()
    if not lines or not lines[0].strip():
        return None
    return f"pid {lines[0].strip()}, started {lines[2].strip() if len(lines) > 2 else '?'}"


class ShellController:
    """Every operation expressed as commands run on the node as the data folder's owner."""

    kind = "shell"

    def __init__(self, node: Node):
        if not node.data_dir:
            raise ConfigError(f"node {node.name} has no data_dir",
                              hint=f"set nodes[].data_dir for {node.name} (the PGDATA on its host)")
        self.node = node
        self.data_dir = node.data_dir.rstrip("/") or "/"
        self._bindir: str | None = node.bin_dir

    # -- what a subclass supplies ----------------------------------------------------------

    def _exec(self, argv: Sequence[str], *, timeout: float | None, input: str | None,
              env: Mapping[str, str] | None, check: bool, what: str | None = None) -> proc.Result:
        raise NotImplementedError

    def _bin(self, name: str) -> str:
        """The path of a PostgreSQL program on the node: bin_dir, else found there once."""
        if name in PLAIN_PROGRAMS:
            return name
        if self._bindir is None:
            res = self._sh(_FIND_BIN_SH, self.data_dir, check=False, what="locate PostgreSQL binaries")
            if res.returncode != 0 or not res.stdout.strip():
                raise DbopsError(f"PostgreSQL binaries not found on node {self.node.name}",
                                 hint=f"set nodes[].bin_dir for {self.node.name}")
            self._bindir = res.stdout.strip().splitlines()[-1]
        return f"{self._bindir}/{name}"

    # -- generic -----------------------------------------------------------------------------

    def run(self, argv: Sequence[str], *, timeout: float | None = 300.0, input: str | None = None,
            env: Mapping[str, str] | None = None, check: bool = True) -> proc.Result:
        return self._exec(list(argv), timeout=timeout, input=input, env=env, check=check)

    def _path(self, rel: str) -> str:
        return f"{self.data_dir}/{rel}"

    def _sh(self, script: str, *args: str, timeout: float | None = 60.0, input: str | None = None,
            env: Mapping[str, str] | None = None, check: bool = True, what: str | None = None) -> proc.Result:
        return self._exec(["sh", "-c", script, "sh", *args], timeout=timeout, input=input, env=env, check=check,
                          what=what)

    def read_file(self, rel: str) -> str | None:
        """A file of the data folder, or None when it does not exist."""
        res = self._sh(_READ_SH, self._path(rel), check=False, what=f"read {rel}")
        if res.returncode == 3:
            return None
        if res.returncode != 0:
            raise CommandError(f"cannot read {rel} on node {self.node.name}", returncode=res.returncode,
                               stderr=res.stderr)
        return res.stdout

    def write_file(self, rel: str, text: str) -> None:
        """Replace a file of the data folder atomically (content sent on stdin)."""
        self._sh(_WRITE_SH, self._path(rel), input=text, what=f"write {rel}")

    def remove_file(self, rel: str) -> None:
        self._exec(["rm", "-f", self._path(rel)], timeout=30, input=None, env=None, check=True)

    # -- server lifecycle --------------------------------------------------------------------

    def _pg_ctl(self, *args: str, timeout: float, check: bool = True) -> proc.Result:
        return self._exec([self._bin("pg_ctl"), "-D", self.data_dir, *args], timeout=timeout, input=None,
                          env=None, check=check, what=f"pg_ctl {args[0] if args else ''} on {self.node.name}")

    def log_file(self) -> str:
        return self.node.log_file or self._path("log/dbops-server.log")

    def start(self, *, timeout: float = 120.0) -> None:
        logf = self.log_file()
        self._exec(["mkdir", "-p", logf.rsplit("/", 1)[0] or "/"], timeout=30, input=None, env=None, check=True)
        try:
            self._pg_ctl("start", "-w", "-s", "-t", str(int(max(timeout, 1))), "-l", logf, timeout=timeout + 15)
        except CommandError as e:
            raise PostgresError(f"PostgreSQL on node {self.node.name} did not start", detail=e.detail,
                                hint=f"see the server log {logf}") from None

    def stop(self, mode: str = "fast", *, timeout: float = 120.0) -> None:
        if mode not in STOP_MODES:
            raise UsageError(f"unknown stop mode {mode!r} (expected one of {', '.join(STOP_MODES)})")
        try:
            self._sh(_STOP_SH, self._bin("pg_ctl"), self.data_dir, mode, str(POLL_SECONDS), timeout=timeout,
                     what=f"stop ({mode}) on {self.node.name}")
        except CommandError as e:
            if self.is_running():
                raise PostgresError(f"PostgreSQL on node {self.node.name} did not stop ({mode})",
                                    detail=e.detail) from None

    def restart(self, mode: str = "fast", *, timeout: float = 120.0) -> None:
        self.stop(mode, timeout=timeout)
        self.start(timeout=timeout)

    def fence(self, mode: str = "fast", *, timeout: float = 120.0) -> ControlData:
        if mode not in STOP_MODES:
            raise UsageError(f"unknown stop mode {mode!r} (expected one of {', '.join(STOP_MODES)})")
        res = self._sh(_FENCE_SH, self._bin("pg_ctl"), self.data_dir, mode, self._bin("pg_controldata"),
                       str(POLL_SECONDS / 2), timeout=timeout, what=f"stop ({mode}) on {self.node.name}")
        return cdmod.parse(res.stdout)

    def status(self) -> RunState:
        res = self._pg_ctl("status", timeout=30, check=False)
        if res.returncode == 0:
            pid = None
            for tok in res.stdout.replace(")", " ").split():
                if tok.isdigit():
                    pid = int(tok)
                    break
            return RunState(True, pid)
        if res.returncode == 3:
            return RunState(False)
        raise DbopsError(f"cannot tell whether PostgreSQL runs on node {self.node.name}",
                         detail=(res.stderr or res.stdout).strip(),
                         hint=f"is data_dir {self.data_dir} right for node {self.node.name}?")

    def is_running(self) -> bool:
        return self.status().running

    def promote(self, *, timeout: float = 60.0) -> None:
        self._pg_ctl("promote", "-w", "-s", "-t", str(int(max(timeout, 1))), timeout=timeout + 15)

    # -- control file and recovery configuration ---------------------------------------------

    def controldata(self) -> ControlData:
        res = self._exec([self._bin("pg_controldata"), "-D", self.data_dir], timeout=30, input=None,
                         env={"LANG": "C", "LC_ALL": "C"}, check=True, what=f"pg_controldata on {self.node.name}")
        return cdmod.parse(res.stdout)

    def write_standby_config(self, primary_conninfo: str, slot: str | None) -> None:
        text = self.read_file(AUTO_CONF) or ""
        self.write_file(AUTO_CONF, pgconf.set_params(text, {"primary_conninfo": primary_conninfo,
                                                            "primary_slot_name": slot}))
        self.remove_file(RECOVERY_SIGNAL)
        self.write_file(STANDBY_SIGNAL, "")

    def remove_standby_signal(self) -> None:
        self.remove_file(STANDBY_SIGNAL)

    def add_standby_signal(self) -> None:
        self.write_file(STANDBY_SIGNAL, "")

    def clear_stale_pidfile(self) -> str | None:
        res = self._sh(_STALE_PID_SH, self.data_dir, check=False, what=f"stale postmaster.pid on {self.node.name}")
        return res.stdout.strip() or None

    def fence_as_standby(self, primary_conninfo: str, slot: str | None) -> Fence:
        saved = self.read_file(AUTO_CONF)
        text = pgconf.set_params(saved or "", {"primary_conninfo": primary_conninfo, "primary_slot_name": slot})
        try:
            res = self._sh(_FENCE_STANDBY_SH, self.data_dir, input=text, what=f"fence {self.node.name} as a standby")
        except DbopsError:
            # Half done: put postgresql.auto.conf back (best effort) and leave any standby.signal, so the
            # node comes up in recovery if started; the caller's rollback removes the signal.
            with contextlib.suppress(DbopsError):
                self._put_back_auto_conf(saved)
            raise
        return Fence(saved, postmaster_identity(res.stdout))

    def unfence(self, fence: Fence) -> None:
        self.remove_file(STANDBY_SIGNAL)
        self._put_back_auto_conf(fence.saved_auto_conf)

    def _put_back_auto_conf(self, saved: str | None) -> None:
        if saved is None:
            self.remove_file(AUTO_CONF)
        else:
            self.write_file(AUTO_CONF, saved)

    def postmaster(self) -> str | None:
        """The running (or last) postmaster's identity from postmaster.pid, or None."""
        return postmaster_identity(self.read_file(POSTMASTER_PID))

    def has_standby_signal(self) -> bool:
        res = self._exec(["test", "-f", self._path(STANDBY_SIGNAL)], timeout=30, input=None, env=None, check=False)
        return res.returncode == 0

    def rewind(self, source_conninfo: str, *, password: str | None = None, restore_target_wal: bool = False,
               timeout: float = 3600.0) -> proc.Result:
        if "password" in source_conninfo.lower():
            raise UsageError("pass the password separately, never inside the conninfo (it would show in argv)")
        env = {"PGPASSWORD": password} if password else None
        argv = [self._bin("pg_rewind"), "-D", self.data_dir, f"--source-server={source_conninfo}", "--progress"]
        if restore_target_wal:  # WAL the target needs but no longer has comes from its restore_command
            argv.append("--restore-target-wal")
        return self._exec(argv, timeout=timeout, input=None, env=env, check=True, what=f"pg_rewind on {self.node.name}")

    def waldump(self, *args: str, timeout: float = 300.0) -> proc.Result:
        return self._exec([self._bin("pg_waldump"), "-p", self._path("pg_wal"), *args], timeout=timeout, input=None,
                          env={"TZ": "UTC", "LANG": "C", "LC_ALL": "C"}, check=False,
                          what=f"pg_waldump on {self.node.name}")

    def setting(self, name: str) -> str:
        res = self._exec([self._bin("postgres"), "-D", self.data_dir, "-C", name], timeout=30, input=None,
                         env=None, check=True, what=f"postgres -C {name} on {self.node.name}")
        return res.stdout.strip()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.node.name})"


def remote_command(argv: Sequence[str], env: Mapping[str, str] | None) -> tuple[list[str], str]:
    """Wrap argv so that env is read from stdin on the far side (never on a command line).

    Returns the argv to run there and the stdin prefix (``K=V`` lines, then an empty line).
    The remote ``sh`` reads stdin byte by byte, so whatever follows the prefix reaches argv's
    program untouched.
    """
    if not env:
        return list(argv), ""
    lines = []
    for k, v in env.items():
        if not k.replace("_", "").isalnum() or "\n" in v or "\r" in v:
            raise UsageError(f"environment variable {k!r} cannot be sent to a remote node")
        lines.append(f"{k}={v}\n")
    script = 'while IFS= read -r kv && [ -n "$kv" ]; do export "$kv"; done; exec "$@"'
    return ["sh", "-c", script, "sh", *argv], "".join(lines) + "\n"


def quote_argv(argv: Sequence[str]) -> str:
    return shlex.join(list(argv))


def wait_until(pred, *, timeout: float, interval: float = POLL_SECONDS) -> bool:
    """Poll pred() until it is true or timeout seconds pass; returns the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
