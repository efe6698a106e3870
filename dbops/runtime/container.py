"""Throwaway servers in containers: podman and docker alike (the same CLI verbs).

Two ways to get PostgreSQL into the container:

* ``image`` (production): ``docker run postgres:15`` / ``podman run IMAGE``. The image's
  entrypoint script is bypassed (``--entrypoint postgres``): it would otherwise look for a
  cluster under its own PGDATA and initialise a new one.
* ``rootfs`` (podman only): a host folder as the root filesystem, as a throw-away overlay
  (``--rootfs /:O``: the host's own root, whose writes vanish with the container). The
  PostgreSQL binaries are the host's (``bin_dir``, or located like ``dbops.pg.binaries``).

Either way the server runs as the uid:gid that owns the data folder (PostgreSQL insists that
its user owns it), with ``postgres -D /data -c ...`` as the child of a small ``sh`` (``KEEPER``, the
container's first process): it passes the stop signals on, writes postgres's exit status to the run
folder (``SERVER_EXIT``) and keeps the container until remove(). A container's exit unmounts its
root; with ``rootfs`` that is an overlay whose upper folder is under podman's run root, and
unmounting it syncs the file system under that (where it is not a tmpfs: the scratch copy, 2.1 GB
written out within a second of the stop at scale 100) while pg_checksums starts on the stopped copy.
Removed after the copy is gone, the container's exit finds the copy's pages dropped, never written
(see docs/backups.md, "Scratch removal and pg_checksums' container").
The data folder is mounted at /data, the
WAL folder read-only at /wal, the run folder (generated pg_hba.conf, ...) at /dbops-run, the
private folder of its Unix socket at /dbops-sock (the server listens on no TCP address, the host
connects through that socket: see :mod:`dbops.runtime.base`), and each tablespace folder of the
spec's ``mounts`` at its path (a scratch copy at its own host path; a tablespace created during
replay at its recorded location, hiding whatever is there).

Networking, as found with podman 4.3 (rootful, netavark, runc) on Debian 12:

* ``--network host`` (the default, ``network="host"``): the container shares the host's network
  namespace (the server itself listens on no TCP port); the socket is named after the spec's port.
* ``network="publish"``: the container gets its own network namespace and the socket is named
  after port 5432. (The name is kept from when the server listened on TCP behind ``-p``.)

The engine CLI, containers.conf and the labels that let a later run remove a killed run's
containers live in :mod:`dbops.runtime.engine`.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Mapping, Sequence

from dbops import log, proc
from dbops.errors import CommandError, ConfigError, EngineError, PostgresError
from dbops.pg import binaries
from dbops.runtime.base import DATA_PATH, MINIMAL_ENV, RUN_PATH, SOCKET_PATH, WAL_PATH, InstanceSpec, Owner, check_stop_mode
from dbops.runtime.instance import InstanceBase
from dbops.runtime.serverconf import prepare_run_dir, remove_run_dir, server_settings, setting_args, socket_dir
from dbops.runtime.engine import KILL_TIMEOUT, Engine, cleanup_stale, creator_labels, force_remove, label_args

_log = log.get("runtime.container")

NETWORKS = ("host", "publish")
CONTAINER_PORT = 5432
STOP_SIGNALS = {"smart": "TERM", "fast": "INT", "immediate": "QUIT"}
KILL_GRACE = 30.0  # seconds a container whose kill was refused may take to end on its own (or its server)
EXIT_POLL = 0.02  # seconds between looks for the server's exit status file (a stat)
INSPECT_TRIES, INSPECT_RETRY_DELAY = 3, 0.5  # an engine's inspect that fails for another reason than "no such"
ENGINE_POLL = 1.0  # seconds between asking the engine whether the container itself still runs

# The server container's first process (``sh -c KEEPER dbops-server POSTGRES ARGS...``, POSIX sh: dash,
# bash): postgres runs as its child; TERM, INT and QUIT (the stop modes, sent to the container's
# first process by `ENGINE kill`) are passed on to it (a background child starts with INT and QUIT
# ignored: the postmaster sets its own handlers for all three). Once postgres has exited, its status
# (128 + N when killed by signal N) is written over the blank status file that start() placed in the
# run folder (in place, ``1<>``: no block to allocate, so a filesystem that filled up meanwhile cannot
# lose it; a blank file is no status yet; should even that write fail, the container ends at once with
# the status, which the engine then reports) and the container stays until it is removed (SIGKILL), asleep (``sleep``:
# the official postgres images have it; where it is missing the container ends, as before). `wait`
# interrupted by a signal returns before postgres exited: it is waited for again while it exists (an
# exited, unreaped child still does; `wait` reaps it), and once more after (a child the shell reaped
# while a trap ran: its status, not the interrupted wait's; 127 when it was reported already). ``STOP_SIGNAL`` is the engine's own stop
# (`ENGINE stop`, by hand): a fast shutdown, after which the container ends too, with postgres's status.
SERVER_EXIT = "server.exit"
STOP_SIGNAL = "USR2"
KEEPER = (
    "stop=; trap 'kill -TERM \"$pid\" 2>/dev/null' TERM; trap 'kill -INT \"$pid\" 2>/dev/null' INT; "
    "trap 'kill -QUIT \"$pid\" 2>/dev/null' QUIT; "
    f"trap 'stop=1; kill -INT \"$pid\" 2>/dev/null' {STOP_SIGNAL}; "
    '"$@" & pid=$!; '
    'while :; do wait "$pid"; status=$?; kill -0 "$pid" 2>/dev/null || break; done; '
    'wait "$pid"; last=$?; [ "$last" = 127 ] || status=$last; '
    f'{{ printf \'%s\\n\' "$status" 1<>{RUN_PATH}/{SERVER_EXIT}; }} 2>/dev/null || exit "$status"; '
    "trap '' TERM INT QUIT; "
    f"trap 'exit \"$status\"' {STOP_SIGNAL}; "
    '[ -z "$stop" ] || exit "$status"; '
    'while sleep 3600 & wait "$!"; [ "$?" != 127 ]; do :; done; exit "$status"'
)


STATUS_BLANK = " " * 15 + "\n"  # room for any exit status, written before the server starts


def blank_status(run_dir: Path, owner: Owner) -> None:
    """The status file KEEPER writes over in place once postgres exits: written now, while the scratch
    filesystem has room, so that its block is the file's already when the server ends on a full disk
    (a new file's write would fail there, and the server's end would go unseen until the start timeout)."""
    path = run_dir / SERVER_EXIT
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, STATUS_BLANK.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    owner.chown(path)


# --------------------------------------------------------------------------- runtime


class ContainerRuntime:
    """Starts throwaway servers with ``podman``/``docker`` from an image or a rootfs."""

    def __init__(self, engine: Engine, *, image: str | None = None, rootfs: str | None = None,
                 bin_dir: str | None = None, extra_args: Sequence[str] = (), network: str = "host",
                 db_user: str = "postgres", shm_size: str = "1g") -> None:
        if bool(image) == bool(rootfs):
            raise ConfigError("a container runtime needs either an image or a rootfs (not both)",
                              hint="runtime.image: postgres:15, or (podman) runtime.rootfs: /")
        if rootfs and engine.name != "podman":
            raise ConfigError(f"{engine.name} cannot run a rootfs (podman's --rootfs)", hint="set runtime.image")
        if network not in NETWORKS:
            raise ConfigError(f"unknown runtime network {network!r}", hint="one of " + ", ".join(NETWORKS))
        if not re.fullmatch(r"[1-9][0-9]{0,12}[kmg]?", shm_size.lower()):
            raise ConfigError(f"runtime.shm_size {shm_size!r} is not a size",
                              hint="a number of bytes with k, m or g after it, e.g. 1g")
        self.cli = engine
        self.engine = engine.name
        self.image = image
        self.rootfs = rootfs
        self.bin_dir = bin_dir
        self.extra_args = tuple(extra_args)
        self.network = network
        self.db_user = db_user
        self.shm_size = shm_size.lower()
        self._cleaned = False

    def host_root(self) -> bool:
        """The rootfs is this host's own root (``rootfs: /``): a container's programs are the host's."""
        return bool(self.rootfs) and os.path.realpath((self.rootfs or "").split(":", 1)[0]) == "/"

    # ---- argv builders (pure: no engine calls)

    def program(self, name: str) -> str:
        """A PostgreSQL program as the container sees it: bin_dir/name, or the bare name for an image."""
        if os.sep in name:
            return name
        if self.rootfs:
            return os.path.join(binaries.bindir(self.bin_dir), name)
        return os.path.join(self.bin_dir, name) if self.bin_dir else name

    def _payload(self, argv: Sequence[str], *, kept: bool = False) -> list[str]:
        """What follows the options: the image (or rootfs) and the program to run; ``kept``: run by
        ``KEEPER``, which keeps the container once the program exited."""
        prog = self.program(argv[0])
        if kept:
            prog, argv = "/bin/sh", ["/bin/sh", "-c", KEEPER, "dbops-server", prog, *argv[1:]]
        if self.rootfs:
            rootfs = self.rootfs if ":" in self.rootfs else f"{self.rootfs}:O"
            return ["--rootfs", rootfs, prog, *argv[1:]]
        return ["--entrypoint", prog, str(self.image), *argv[1:]]

    def _mounts(self, spec: InstanceSpec, run_dir: Path, sock_dir: Path | None = None) -> list[str]:
        out = ["-v", f"{Path(spec.data_dir).resolve()}:{DATA_PATH}", "-v", f"{run_dir.resolve()}:{RUN_PATH}",
               "-v", f"{(sock_dir or run_dir).resolve()}:{SOCKET_PATH}"]
        if spec.wal_dir is not None:
            out += ["-v", f"{Path(spec.wal_dir).resolve()}:{WAL_PATH}:ro"]
        for host, inside in spec.mounts:
            out += ["-v", f"{Path(host).resolve()}:{inside}"]
        return out

    def inner_port(self, spec: InstanceSpec) -> int:
        return spec.port if self.network == "host" else CONTAINER_PORT

    def server_argv(self, spec: InstanceSpec, *, name: str, owner: Owner, run_dir: Path,
                    settings: Mapping[str, str], labels: Mapping[str, str], sock_dir: Path | None = None) -> list[str]:
        """``run -d ...`` for the server (postgres as the child of ``KEEPER``)."""
        net = ["--network", "host"] if self.network == "host" else []
        return ["run", "-d", "--name", name, *label_args(labels), "--user", f"{owner.uid}:{owner.gid}",
                "--stop-signal", f"SIG{STOP_SIGNAL}", "--shm-size", self.shm_size, *net,
                *self._mounts(spec, run_dir, sock_dir), *self.extra_args,
                *self._payload(["postgres", "-D", DATA_PATH, *setting_args(settings)], kept=True)]

    def tool_argv(self, argv: Sequence[str], spec: InstanceSpec, *, name: str, owner: Owner, run_dir: Path,
                  env_names: Sequence[str], labels: Mapping[str, str], sock_dir: Path | None = None,
                  reads: Sequence[Path] = ()) -> list[str]:
        """``run --rm ...`` for a one-shot tool with the instance's mounts (the server is not running),
        and each folder of ``reads`` read-only at its own path."""
        net = ["--network", "host"] if self.network == "host" else []
        envs = [a for n in env_names for a in ("-e", n)]
        extra = [a for p in reads for a in ("-v", f"{Path(p).resolve()}:{Path(p).resolve()}:ro")]
        return ["run", "--rm", "--name", name, *label_args(labels), "--user", f"{owner.uid}:{owner.gid}",
                *net, *envs, *self._mounts(spec, run_dir, sock_dir), *extra, *self.extra_args, *self._payload(argv)]

    def exec_argv(self, argv: Sequence[str], *, container: str, owner: Owner, env_names: Sequence[str]) -> list[str]:
        """``exec ...`` for a tool inside the running server's container."""
        envs = [a for n in env_names for a in ("-e", n)]
        return ["exec", "--user", f"{owner.uid}:{owner.gid}", *envs, container, self.program(argv[0]), *argv[1:]]

    def probe_argv(self) -> list[str]:
        """``run --rm ... postgres --version``: can this engine start a throwaway container here?"""
        return self.oneshot_argv(["postgres", "--version"])

    def oneshot_argv(self, argv: Sequence[str]) -> list[str]:
        """``run --rm ...`` of one program as a throwaway instance would see it (its image or rootfs)."""
        labels = creator_labels(uuid.uuid4().hex[:12], "probe")
        return ["run", "--rm", *label_args(labels), "--network", "host", *self.extra_args, *self._payload(argv)]

    # ---- lifecycle

    def cleanup_stale(self) -> list[str]:
        return cleanup_stale(self.cli)

    def prepare(self) -> None:
        """What start() does first, once per runtime: the containers of runs killed before they removed
        theirs go (an engine call or two, 0.05-0.2 s). A caller may run it beside other work before
        start(); when it fails, start() does it again and reports it."""
        if not self._cleaned:
            self.cleanup_stale()
            self._cleaned = True

    def start(self, spec: InstanceSpec) -> "ContainerInstance":
        self.prepare()
        owner = Owner.of(Path(spec.data_dir))
        run_id = uuid.uuid4().hex[:12]
        name = f"dbops-{_slug(spec.name)}-{run_id}"
        labels = creator_labels(run_id, spec.name)
        run_dir, created = prepare_run_dir(spec, owner)
        sock, sock_created = run_dir, False
        try:
            sock, sock_created = socket_dir(run_dir, owner)
            blank_status(run_dir, owner)
            settings = server_settings(
                spec, run_dir, wal_path=WAL_PATH if spec.wal_dir is not None else None, run_path=RUN_PATH,
                owner=owner, socket_path=SOCKET_PATH, port=self.inner_port(spec),
            )
            argv = self.server_argv(spec, name=name, owner=owner, run_dir=run_dir, settings=settings, labels=labels,
                                    sock_dir=sock)
            self.cli.run(argv, timeout=600)  # may pull the image
        except BaseException:
            # Interrupted or failed after the engine may have created it: it goes, by name.
            try:
                force_remove(self.cli, name)
            finally:
                remove_run_dir(run_dir, created, sock, sock_created)
            raise
        log.event(_log, logging.INFO, "container started", engine=self.engine, container=name, port=spec.port)
        return ContainerInstance(self, spec, name, owner, run_dir, created, labels, (sock, sock_created))


class ContainerInstance(InstanceBase):
    def __init__(self, rt: ContainerRuntime, spec: InstanceSpec, name: str, owner: Owner,
                 run_dir: Path, created: bool, labels: Mapping[str, str], sock: tuple[Path, bool]) -> None:
        self.spec = spec
        self.name = name
        self.host = str(sock[0])  # the host folder of the server's Unix socket
        self._sock_created = sock[1]
        self.port = rt.inner_port(spec)  # names the socket file
        self.data_path = DATA_PATH
        self.wal_path = WAL_PATH if spec.wal_dir is not None else None
        self.db_user = rt.db_user
        self.run_dir = run_dir
        self._rt = rt
        self._engine = rt.cli
        self._owner = owner
        self._created = created
        self._labels = dict(labels)
        self._removed = False
        self._tools = itertools.count(1)
        self._waits = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dbops-container-wait")
        self._stopping: tuple[str, float, float, Future] | None = None  # a stop whose exit status has not come yet
        self._settling = threading.Lock()

    def is_running(self) -> bool:
        """Whether postgres runs: false once it exited, although its container stays until remove()."""
        self._settle()
        return self._status() is None

    def _status(self) -> str | None:
        """postgres's exit status once it exited, else None: what ``KEEPER`` wrote to the run folder, or
        the container's own exit code when the container ended (its first process killed, or removed
        by hand: '?' when the engine knows it no more)."""
        status = self._exit_file()
        if status is not None:
            return status
        res = self._inspect_state()
        running, code = (res.stdout.split() + ["", ""])[:2] if res.returncode == 0 else ("", "?")
        if running == "true":
            return self._exit_file()  # it may have exited since the file was looked for
        return self._exit_file() or code or "?"

    def _inspect_state(self):
        """`ENGINE inspect` of the container's running flag and exit code. A container the engine knows
        no more is a failed call ('no such container'/'object'); any other failure (the engine's
        database locked, its storage full) is asked again, and if it persists raised as EngineError:
        the server's state is unknown, which is not the same as its having exited (a validation would
        otherwise blame the backup for it)."""
        for attempt in range(INSPECT_TRIES):
            res = self._engine.run(["inspect", "--format", "{{.State.Running}} {{.State.ExitCode}}", self.name],
                                   check=False, timeout=60)
            if res.returncode == 0 or "no such" in (res.stdout + res.stderr).lower():
                return res
            if attempt + 1 < INSPECT_TRIES:
                time.sleep(INSPECT_RETRY_DELAY)
        raise EngineError(
            f"the {self._rt.engine} engine could not tell whether the container {self.name} still runs",
            detail=(res.stderr or res.stdout).strip()[-1000:] or f"inspect exited with status {res.returncode}",
            hint="look at the container engine (`podman info` / `docker info`); the throwaway container "
                 "is removed by the next run")

    def _exit_file(self) -> str | None:
        try:
            return (self.run_dir / SERVER_EXIT).read_text().strip() or None
        except FileNotFoundError:
            return None

    def logs(self, tail: int = 50) -> str:
        res = self._engine.run(["logs", "--tail", str(tail), self.name], check=False, timeout=60)
        return res.stdout + res.stderr if res.returncode == 0 else ""

    def ended_by(self) -> str | None:
        """SIGKILL, as the host's OOM killer sends it: postgres's status 137 (the container stays), or the
        container's own end flagged by the engine (the OOM killer chose its first process). The engine
        flags an OOM kill only once the container itself ended: postgres killed by it is status 137 here."""
        status = self._exit_file()
        res = self._engine.run(["inspect", "--format", "{{.State.Running}} {{.State.OOMKilled}} {{.State.ExitCode}}",
                                self.name], check=False, timeout=60)
        running, oom, code = (res.stdout.split() + ["", "", ""])[:3] if res.returncode == 0 else ("", "", "")
        status = status or self._exit_file()
        if status is not None:
            if status == "137":
                return f"PostgreSQL in the container {self.name} ended with status 137: it was terminated by signal 9"
            return None
        if running != "false":
            return None
        if oom == "true":
            return f"the container {self.name} was killed by the OOM killer (its memory limit): " \
                   f"its main process was terminated by signal 9"
        if code == "137":  # 128 + SIGKILL: a memory cgroup's OOM kill where the engine does not flag it
            return f"the container {self.name} ended with status 137: its main process was terminated by signal 9"
        return None

    def stop(self, mode: str = "fast", timeout: float = 600.0) -> None:
        """Signal the server (smart: TERM, fast: INT, immediate: QUIT) and wait for it to exit.

        Returns once postgres has exited, its status read: ``KEEPER`` writes it to the run folder once
        postgres was reaped, a few milliseconds after the postmaster removed its postmaster.pid (its
        last act, after every process of the server ended), so the data folder is final. The container
        stays, its root mounted, until remove(). Raises PostgresError when the server does not exit in
        time, or exits non-zero from a smart/fast stop; EngineError when the engine refuses the signal
        and the server is still up ``KILL_GRACE`` later, or does not answer within ``KILL_TIMEOUT``.
        A server that had exited already is not signalled (nothing is raised).
        """
        check_stop_mode(mode)
        self._settle()
        pid_file = Path(self.spec.data_dir) / "postmaster.pid"
        watch_pid = pid_file.exists()  # else only the engine can tell
        if self._exit_file() is not None:  # it ended on its own before (its container stays): nothing to stop
            return
        # The signal at once (no `inspect` before it: one engine call fewer, ~0.1 s); the engine
        # refuses to signal a container that is not running (killed), and only then is it asked why.
        sent = self._signal(mode)
        if sent.returncode != 0:  # not running (it ended on its own, maybe just now), or the engine refused
            deadline = time.monotonic() + min(timeout, KILL_GRACE)
            while self.is_running() and (not watch_pid or pid_file.exists()):  # no postmaster.pid: server down
                if time.monotonic() >= deadline:
                    raise self._not_signalled(mode, "failed", (sent.stderr or sent.stdout).strip()[-1000:] or None)
                time.sleep(0.2)
            return
        # A thread of its own: a tool in another thread asking meanwhile (is_running) waits for the same.
        self._stopping = (mode, time.monotonic(), timeout, self._waits.submit(self._wait_exit, timeout))
        self._settle()

    def _wait_exit(self, timeout: float) -> str:
        """postgres's exit status once it exited (see _status); TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        next_engine = time.monotonic() + ENGINE_POLL
        while True:
            status = self._exit_file()
            if status is not None:
                return status
            now = time.monotonic()
            if now >= next_engine:  # the container itself ended (killed, removed): no file will come
                status = self._status()
                if status is not None:
                    return status
                next_engine = time.monotonic() + ENGINE_POLL
            if now >= deadline:
                raise TimeoutError(f"postgres still runs after {timeout:.0f} s")
            time.sleep(EXIT_POLL)

    def _signal(self, mode: str) -> proc.Result:
        """``ENGINE kill --signal SIG`` for the stop mode; an engine that does not answer within
        ``KILL_TIMEOUT`` fails at once (a stop never waits out its own timeout for a signal not sent)."""
        try:
            return self._engine.run(["kill", "--signal", STOP_SIGNALS[mode], self.name], check=False,
                                    timeout=KILL_TIMEOUT)
        except CommandError as e:  # the engine hung: proc.run stopped it
            raise self._not_signalled(mode, f"did not answer within {KILL_TIMEOUT:.0f} s",
                                      f"{e.message}\n{e.detail or ''}".strip()) from None

    def _not_signalled(self, mode: str, why: str, detail: str | None) -> EngineError:
        engine = self._engine.name
        return EngineError(
            f"could not stop PostgreSQL ({self.spec.name}, {mode}): `{engine} kill` {why} for its container "
            f"{self.name}",
            detail=detail,
            hint=f"the container engine refused or did not answer; stop the container by hand: "
                 f"`{engine} kill --signal KILL {self.name}` then `{engine} rm -f {self.name}`, and check "
                 f"the engine (`{engine} ps`)",
        )

    def _settle(self) -> None:
        """Wait for the engine's report of a stop begun by stop(); raise what that stop should raise."""
        with self._settling:  # a tool in another thread (pg_checksums) may ask at the same time
            if self._stopping is None:
                return
            mode, t0, timeout, waited = self._stopping
            self._stopping = None
            try:
                status = waited.result()
            except (TimeoutError, CommandError) as e:
                raise PostgresError(
                    f"PostgreSQL ({self.spec.name}) did not stop ({mode}) within {timeout:.0f} s",
                    detail=(getattr(e, "detail", None) or str(e)) + "\n" + self.logs(20),
                    hint="it is still running; remove() kills it",
                ) from None
        log.event(_log, logging.INFO, "server exited", container=self.name, mode=mode, status=status,
                  seconds=round(time.monotonic() - t0, 2))
        if mode != "immediate" and status != "0":
            raise PostgresError(f"PostgreSQL ({self.spec.name}) exited with status {status} while stopping ({mode})",
                                detail=self.logs(20).strip() or None)

    def run_tool(self, argv: Sequence[str], *, timeout: float | None = 600, check: bool = True,
                 env: Mapping[str, str] | None = None, reads: Sequence[Path] = (),
                 cancel: threading.Event | None = None) -> proc.Result:
        """Run a PostgreSQL client or tool next to the server, as the data folder's owner.

        While the server runs: ``exec`` into its container; otherwise a one-shot ``run --rm``
        with the same mounts (pg_checksums needs the server stopped), or, with ``rootfs: /`` and
        dbops as root or the owner, the same program on this host (:meth:`_run_here`). Paths are the
        container's: ``self.data_path`` (/data), ``self.wal_path`` (/wal), each folder of ``reads``
        its host path (read-only; a one-shot container only: a running server's has none). PGHOST, PGPORT,
        PGUSER and PGDATA point at this instance; environment values travel as ``-e NAME``
        (taken from the engine client's environment), never on a command line.
        """
        tool_env = {"PGHOST": SOCKET_PATH, "PGPORT": str(self._rt.inner_port(self.spec)), "PGUSER": self.db_user,
                    "PGDATA": DATA_PATH, "LANG": "C", "LC_ALL": "C", **(env or {})}
        if not reads and self.is_running():
            args = self._rt.exec_argv(argv, container=self.name, owner=self._owner, env_names=list(tool_env))
        elif self._rt.host_root() and os.geteuid() in (0, self._owner.uid):
            return self._run_here(argv, tool_env, timeout=timeout, check=check, cancel=cancel)
        else:
            name = f"{self.name}-tool{next(self._tools)}"
            args = self._rt.tool_argv(argv, self.spec, name=name, owner=self._owner, run_dir=self.run_dir,
                                      env_names=list(tool_env), labels=self._labels, sock_dir=Path(self.host),
                                      reads=reads)
            try:
                return self._engine.run(args, env=tool_env, timeout=timeout, check=check, cancel=cancel)
            except BaseException:
                force_remove(self._engine, name)  # --rm does not fire when the client is killed
                raise
        return self._engine.run(args, env=tool_env, timeout=timeout, check=check, cancel=cancel)

    def _run_here(self, argv: Sequence[str], tool_env: Mapping[str, str], *, timeout: float | None,
                  check: bool, cancel: threading.Event | None = None) -> proc.Result:
        """A one-shot tool of a ``rootfs: /`` runtime, run on this host as the data folder's owner: the
        same program a container would run (its root is this one), without the container, whose exit
        unmounts an overlay kept under podman's run root and so syncs the file system under it (where
        that is not a tmpfs, the scratch copy is written out first: 3 s for 1.5 GB here). The
        container's paths in argv and the environment become their host paths."""
        host = {DATA_PATH: str(Path(self.spec.data_dir).resolve()), SOCKET_PATH: self.host}
        if self.spec.wal_dir is not None:
            host[WAL_PATH] = str(Path(self.spec.wal_dir).resolve())
        env = {**MINIMAL_ENV, **{k: host.get(v, v) for k, v in tool_env.items()}}
        argv = [self._rt.program(argv[0]), *(host.get(a, a) for a in argv[1:])]
        return proc.run(argv, user=self._owner.user_name, env=env, inherit_env=False,
                        timeout=timeout, check=check, cancel=cancel)

    def remove(self) -> None:
        """Force-remove the container (killing the server if it runs) and the run folder. Idempotent.
        Its root is unmounted here (a stopped server's container stays until now): with ``rootfs``, the
        file system under podman's run root is synced then."""
        if self._removed:
            return
        force_remove(self._engine, self.name)
        self._waits.shutdown(wait=True)  # a wait for the exit status still running ends with the container
        self._stopping = None
        remove_run_dir(self.run_dir, self._created, Path(self.host), self._sock_created)
        self._removed = True
        log.event(_log, logging.INFO, "container removed", container=self.name)


def _slug(name: str) -> str:
    s = "".join(ch if ch.isalnum() or ch in "_.-" else "-" for ch in name.lower()).strip("-.")
    return s[:40] or "instance"
