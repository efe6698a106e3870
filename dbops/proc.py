"""The one wrapper every external program goes through.

* argv lists only (never a shell), the binary resolved to a verified path;
* a timeout, after which the whole process group is killed;
* the process group is killed too when dbops itself is interrupted;
* stderr kept (tail) for the error message, with secrets redacted;
* ``user=``: run as another OS user (``runuser -u USER --``) when dbops runs as
  root, which is how PostgreSQL binaries must run (they refuse root).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from dbops import log, secrets
from dbops.errors import CommandError, DbopsError, PreconditionError

_log = log.get("proc")


@dataclass
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def which(name: str, extra_dirs: Sequence[str] = ()) -> str:
    """Resolve a program name to an absolute, executable path, or raise."""
    if os.sep in name:
        p = Path(name)
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
        raise DbopsError(f"program {name} not found or not executable")
    for d in extra_dirs:
        if not d:
            continue
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    found = shutil.which(name)
    if found:
        return found
    raise DbopsError(
        f"program {name!r} not found",
        detail="searched " + ", ".join([*[d for d in extra_dirs if d], "PATH"]),
        hint="install it, or set its folder in the configuration (bin_dir)",
    )


def as_user(argv: list[str], user: str | None) -> list[str]:
    """Prefix argv so it runs as `user` when we are root and someone else is asked for."""
    if not user or os.geteuid() != 0 or user == "root":
        return argv
    return [which("runuser"), "-u", user, "--", *argv]


class Cancelled(Exception):
    """A program stopped because its caller no longer needs its outcome (``run(cancel=...)``)."""


CANCEL_POLL = 0.2  # seconds between two looks at a run's cancel event


def _communicate(p: subprocess.Popen, input: str | bytes | None, timeout: float | None,
                 cancel: threading.Event | None) -> tuple[Any, Any]:
    """``p.communicate``, looking at ``cancel`` every ``CANCEL_POLL`` seconds (raises Cancelled once
    it is set, subprocess.TimeoutExpired past the timeout); no output is lost between two looks."""
    if cancel is None:
        return p.communicate(input=input, timeout=timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    first = True
    while True:
        if cancel.is_set():
            raise Cancelled()
        wait = CANCEL_POLL if deadline is None else min(CANCEL_POLL, max(0.0, deadline - time.monotonic()))
        try:
            return p.communicate(input=input if first else None, timeout=wait)
        except subprocess.TimeoutExpired:
            first = False
            if deadline is not None and time.monotonic() >= deadline:
                raise


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        p.wait(timeout=5)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def _prepare(argv: Sequence[str], user: str | None, env: Mapping[str, str] | None,
             inherit_env: bool) -> tuple[list[str], list[str], dict[str, str]]:
    """(argv with the binary resolved, the full argv with runuser when needed, the environment)."""
    argv = [str(a) for a in argv]
    argv[0] = which(argv[0])
    run_env = dict(os.environ) if inherit_env else {}
    if env:
        run_env.update(env)
    return argv, as_user(argv, user), run_env


def run(
    argv: Sequence[str],
    *,
    timeout: float | None = 300,
    user: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    input: str | bytes | None = None,
    check: bool = True,
    what: str | None = None,
    text: bool = True,
    inherit_env: bool = True,
    cancel: threading.Event | None = None,
) -> Result:
    """Run a program to completion. Raises CommandError on non-zero exit (when check) or timeout.

    The program gets this process's environment plus `env`; only `env` with ``inherit_env=False``.
    ``cancel``: once set, the program (its process group) is stopped and :class:`Cancelled` raised,
    within ``CANCEL_POLL`` seconds.
    """
    argv, full, run_env = _prepare(argv, user, env, inherit_env)
    label = what or Path(argv[0]).name
    _log.debug("run %s", secrets.redact(" ".join(full)))
    t0 = time.monotonic()
    p = subprocess.Popen(
        full,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=run_env,
        cwd=cwd,
        start_new_session=True,
        text=text,
    )
    try:
        out, err = _communicate(p, input, timeout, cancel)
    except Cancelled:
        _kill_group(p)
        raise
    except subprocess.TimeoutExpired:
        _kill_group(p)
        raise CommandError(
            f"{label} did not finish within {timeout:.0f} s and was stopped",
            returncode=None,
            hint="the program may be hung; see the detail for its last output",
        ) from None
    except BaseException:
        _kill_group(p)
        raise
    seconds = time.monotonic() - t0
    if not text:
        out_s, err_s = out, (err or b"").decode(errors="replace")
    else:
        out_s, err_s = out, err
    res = Result(argv=full, returncode=p.returncode, stdout=out_s, stderr=secrets.redact(err_s or ""), seconds=seconds)
    if check and p.returncode != 0:
        raise CommandError(
            f"{label} exited with status {p.returncode}",
            returncode=p.returncode,
            stderr=res.stderr or (out_s if isinstance(out_s, str) else "")[-2000:],
        )
    return res


def spawn(
    argv: Sequence[str],
    *,
    user: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    stdout=None,
    stderr=None,
    inherit_env: bool = True,
) -> subprocess.Popen:
    """Start a long-running program in its own session (for servers and background workers).

    The program gets this process's environment plus `env`; only `env` with ``inherit_env=False``.
    """
    argv, full, run_env = _prepare(argv, user, env, inherit_env)
    _log.debug("spawn %s", secrets.redact(" ".join(full)))
    return subprocess.Popen(
        full,
        stdin=subprocess.DEVNULL,
        stdout=stdout if stdout is not None else subprocess.DEVNULL,
        stderr=stderr if stderr is not None else subprocess.DEVNULL,
        env=run_env,
        cwd=cwd,
        start_new_session=True,
    )


def stop(p: subprocess.Popen) -> None:
    _kill_group(p)


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this pid exists (a zombie counts as alive until reaped)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_INTERRUPTING = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
_unwind = {"depth": 0, "received": None}


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (systemd stop, kill), SIGHUP (the SSH session or terminal went away) and SIGINT unwind
    like Ctrl-C, so cleanup in ``except`` / ``finally`` blocks runs (a rollback, a PgBouncer RESUME).

    Only the first signal interrupts: later ones, and any that arrive inside :func:`unwinding`,
    are logged and ignored, so the cleanup itself runs to its end. (SIGKILL cannot be caught;
    docs/bad-days.md says what each workflow leaves behind then.)
    """

    def handler(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if _unwind["received"] is not None or _unwind["depth"] > 0:
            _log.warning("%s ignored: cleaning up%s", name,
                         f" after {_unwind['received']}" if _unwind["received"] else "")
            return
        _unwind["received"] = name
        _log.warning("%s received: stopping and cleaning up", name)
        raise KeyboardInterrupt

    old: dict[int, object] = {}
    try:
        for sig in _INTERRUPTING:
            old[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)  # type: ignore[arg-type]
        _unwind["received"] = None


@contextlib.contextmanager
def unwinding() -> Iterator[None]:
    """Cleanup that must not be cut short: signals that would interrupt are ignored within."""
    _unwind["depth"] += 1
    try:
        yield
    finally:
        _unwind["depth"] -= 1


def installed_program(name: str) -> str | None:
    """A console script installed with dbops (in this venv's bin folder), else one on PATH."""
    # The venv's real folder: .venv may be a symlink to a place the postgres user can reach.
    for base in (Path(os.path.realpath(sys.prefix)) / "bin", Path(sys.executable).parent):
        cand = base / name
        if cand.exists():
            return str(cand)
    return shutil.which(name)


def dbops_executable() -> str:
    """The dbops console script of this installation, for archive_command / restore_command."""
    found = installed_program("dbops")
    if found:
        return found
    raise DbopsError("cannot find the dbops command to put into archive_command / restore_command",
                     hint="install dbops into this Python's environment, or put `dbops` on PATH")


def chown_to(path: str | os.PathLike, user: str, *, recursive: bool = False) -> None:
    """Give path (and with recursive, everything below it) to an OS user; a no-op unless we are root."""
    if os.geteuid() != 0:
        return
    import pwd

    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise PreconditionError(
            f"OS user {user!r} does not exist",
            hint="install PostgreSQL (Debian: apt-get install postgresql-15), which creates it, or set "
                 "nodes[].os_user to the OS user PostgreSQL runs as",
        ) from None
    os.chown(path, pw.pw_uid, pw.pw_gid)
    if recursive:
        for root, dirs, files in os.walk(path):
            for n in (*dirs, *files):
                os.chown(os.path.join(root, n), pw.pw_uid, pw.pw_gid, follow_symlinks=False)


def port_free(port: int) -> bool:
    """Whether a TCP port on loopback can be bound now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(preferred: int | None = None, taken: set[int] | None = None, below: int = 65536) -> int:
    """A TCP port on loopback that is free now (for a throwaway server): the preferred one if free, else
    any free port below `below` and not in `taken` (a port returned is added to `taken`)."""
    import socket

    taken = taken if taken is not None else set()
    if preferred and preferred not in taken and port_free(preferred):
        taken.add(preferred)
        return preferred
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p < below and p not in taken and port_free(p):
            taken.add(p)
            return p
    raise DbopsError("no free TCP port found on 127.0.0.1")
