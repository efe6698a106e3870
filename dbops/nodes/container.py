"""The container controller: PostgreSQL is the main process of a docker or podman container.

* start / stop are the container's own lifecycle: ``ENGINE start``; ``ENGINE kill
  --signal`` with PostgreSQL's shutdown signal for the mode (smart SIGTERM, fast SIGINT,
  immediate SIGQUIT), then ``ENGINE wait`` and ``ENGINE inspect`` until it shows the container
  stopped (``wait`` can return while it still runs). A plain ``stop`` would SIGKILL a server still
  writing its shutdown checkpoint once the engine's grace period ends.
* commands run with ``ENGINE exec -u OWNER`` while the container runs; while it is
  stopped (reading the control file after a stop, writing standby.signal, pg_rewind)
  they run in a throwaway container sharing its volumes (``--volumes-from``), without
  network - except pg_rewind, which must reach the new primary (and, with
  ``--restore-target-wal``, the object store through the node's restore_command): it runs on
  the node container's own network, with the node container's environment (the variables
  its dbops configuration names), so it connects exactly as the node itself would.
* environment values are passed as ``-e NAME`` (the engine copies the value from its own
  environment), so a secret never appears on a command line.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence

from dbops import proc
from dbops.config import Node
from dbops.errors import CommandError, ConfigError, PostgresError, UsageError
from dbops.nodes.base import POLL_SECONDS, ShellController
from dbops.nodes.protocol import STOP_MODES, RunState
from dbops.pg.controldata import ControlData
from dbops.runtime.engine import Engine

SIGNALS = {"smart": "SIGTERM", "fast": "SIGINT", "immediate": "SIGQUIT"}
FENCE_SETTLE = 15.0  # seconds a fence re-reads the control file until it shows the shutdown


class ContainerController(ShellController):
    kind = "container"

    def __init__(self, node: Node):
        if node.container is None:
            raise ConfigError(f"node {node.name} uses the container controller but has no container settings",
                              hint="add nodes[].container.engine (podman|docker) and nodes[].container.name")
        super().__init__(node)
        self.engine = node.container.engine
        self.cli = Engine(self.engine)
        self.name = node.container.name
        self._image: list[str] | None = None
        # What a helper container gets: no network and nothing of the node's environment,
        # except while pg_rewind runs (see rewind()).
        self._helper_network = "none"
        self._helper_env: dict[str, str] = {}

    # -- argv builders (pure, unit-tested) ------------------------------------------------------

    def _env_flags(self, env: Mapping[str, str] | None) -> list[str]:
        flags: list[str] = []
        for k in env or {}:
            flags += ["-e", k]
        return flags

    def exec_argv(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                  interactive: bool = False) -> list[str]:
        return [self.engine, "exec", *(["-i"] if interactive else []), "-u", self.node.os_user,
                *self._env_flags(env), self.name, *argv]

    def helper_argv(self, argv: Sequence[str], image: Sequence[str], *, env: Mapping[str, str] | None = None,
                    interactive: bool = False, network: str = "none") -> list[str]:
        """A throwaway container on the stopped node's volumes (without network unless given one)."""
        return [self.engine, "run", "--rm", *(["-i"] if interactive else []), "--user", self.node.os_user,
                "--volumes-from", self.name, "--network", network, *self._env_flags(env), *image, *argv]

    def kill_argv(self, mode: str) -> list[str]:
        return [self.engine, "kill", "--signal", SIGNALS[mode], self.name]

    # -- engine calls -----------------------------------------------------------------------------

    def _engine(self, *args: str, timeout: float = 60.0, check: bool = True) -> proc.Result:
        return self.cli.run(args, timeout=timeout, check=check, what=f"{self.engine} {args[0]} {self.name}")

    def _image_args(self) -> list[str]:
        """How to start a helper from the node's own image (or root filesystem, podman --rootfs)."""
        if self._image is None:
            fmt = "{{.Config.Image}}|{{.Rootfs}}" if self.engine == "podman" else "{{.Config.Image}}|"
            out = self._engine("inspect", "--format", fmt, self.name).stdout.strip()
            image, _, rootfs = out.partition("|")
            if rootfs and rootfs != "<no value>":  # podman --rootfs: reuse it as a throwaway overlay
                self._image = ["--rootfs", rootfs if rootfs.endswith(":O") else f"{rootfs}:O"]
            elif image:
                self._image = ["--entrypoint", "", image]
            else:
                raise PostgresError(f"cannot tell the image of container {self.name}")
        return self._image

    def _exec(self, argv: Sequence[str], *, timeout: float | None, input: str | None,
              env: Mapping[str, str] | None, check: bool, what: str | None = None) -> proc.Result:
        interactive = input is not None
        if self.status().running:
            full = self.exec_argv(argv, env=env, interactive=interactive)
        else:
            env = {**self._helper_env, **(env or {})} or None
            full = self.helper_argv(argv, self._image_args(), env=env, interactive=interactive,
                                    network=self._helper_network)
        return proc.run(full, timeout=timeout, input=input, env=env, check=check,
                        what=what or f"{argv[0]} in {self.name}")

    def rewind(self, source_conninfo: str, *, password: str | None = None, restore_target_wal: bool = False,
               timeout: float = 3600.0) -> proc.Result:
        """pg_rewind in a helper on the node's network and with its environment (see the module doc)."""
        if not self.status().running:
            out = self._engine("inspect", self.name).stdout
            try:
                info = json.loads(out)
                info = info[0] if isinstance(info, list) else info
            except (ValueError, IndexError) as e:
                raise PostgresError(f"cannot read `{self.engine} inspect {self.name}`: {e}") from None
            self._helper_network, self._helper_env = helper_context(info)
        try:
            return super().rewind(source_conninfo, password=password, restore_target_wal=restore_target_wal,
                                  timeout=timeout)
        finally:
            self._helper_network, self._helper_env = "none", {}

    # -- lifecycle ---------------------------------------------------------------------------------

    def status(self) -> RunState:
        res = self._engine("inspect", "--format", "{{.State.Running}}|{{.State.Pid}}", self.name, check=False)
        if res.returncode != 0:
            raise CommandError(f"container {self.name} of node {self.node.name} not found",
                               returncode=res.returncode, stderr=res.stderr)
        running, _, pid = res.stdout.strip().partition("|")
        return RunState(running == "true", int(pid) if pid.isdigit() and int(pid) > 0 else None)

    def start(self, *, timeout: float = 120.0) -> None:
        if not self.status().running:
            self._engine("start", self.name, timeout=timeout)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        from dbops.pg import conn

        deadline = time.monotonic() + timeout
        while True:
            try:
                conn.connect(self.node, connect_timeout=2).close()
                return
            except PostgresError as e:
                if time.monotonic() >= deadline:
                    raise PostgresError(f"PostgreSQL in container {self.name} did not accept connections "
                                        f"within {timeout:.0f} s", detail=e.detail,
                                        hint=f"see `{self.engine} logs {self.name}`") from None
                if not self.status().running:
                    raise PostgresError(f"container {self.name} exited while PostgreSQL started",
                                        hint=f"see `{self.engine} logs {self.name}`") from None
            time.sleep(POLL_SECONDS * 5)

    def fence(self, mode: str = "fast", *, timeout: float = 120.0) -> ControlData:
        """A containerised server is PID 1: exec cannot outlive it, so stop fully, then read.

        The engine can report the container stopped a moment before the control file shows the
        shutdown (seen once in a full test run on a quiet machine, podman 4.3: "in archive
        recovery" read right after a fast stop). A clean stop always ends in a shut-down state,
        so the control file is read again until it shows one, for up to ``FENCE_SETTLE`` seconds
        (not after an immediate stop, which never writes one);
        after that, what it says is returned as it is (the caller judges an unclean state)."""
        self.stop(mode, timeout=timeout)
        deadline = time.monotonic() + (min(timeout, FENCE_SETTLE) if mode != "immediate" else 0.0)
        while True:
            cd = self.controldata()
            if cd.state.startswith("shut down") or time.monotonic() >= deadline:
                return cd
            time.sleep(0.5)

    def stop(self, mode: str = "fast", *, timeout: float = 120.0) -> None:
        if mode not in STOP_MODES:
            raise UsageError(f"unknown stop mode {mode!r} (expected one of {', '.join(STOP_MODES)})")
        if not self.status().running:
            return
        deadline = time.monotonic() + timeout
        self._engine(*self.kill_argv(mode)[1:], timeout=30, check=False)
        detail = None
        try:
            self._engine("wait", self.name, timeout=timeout)
        except CommandError as e:
            detail = e.detail
        # `ENGINE wait` can return while the container still runs (a loaded machine, podman's own
        # races): a fence that read the control file then would read a server still shutting down.
        while self.status().running:
            if time.monotonic() >= deadline:
                raise PostgresError(f"container {self.name} did not stop ({mode}) within {timeout:.0f} s",
                                    detail=detail)
            time.sleep(POLL_SECONDS * 5)


# Variables that describe one container, not the node's configuration.
_PER_CONTAINER_ENV = frozenset({"HOSTNAME", "HOME"})


def helper_context(inspect: Mapping) -> tuple[str, dict[str, str]]:
    """From ``ENGINE inspect`` of the node container: the network a helper joins to act like the
    node (its network mode, or with a bridge its first named network) and its environment."""
    host = inspect.get("HostConfig") or {}
    mode = str(host.get("NetworkMode") or "")
    networks = list(((inspect.get("NetworkSettings") or {}).get("Networks") or {}).keys())
    if mode in ("", "default", "bridge") and networks:
        network = networks[0]
    else:
        network = mode or "bridge"
    env: dict[str, str] = {}
    for item in (inspect.get("Config") or {}).get("Env") or []:
        name, sep, value = str(item).partition("=")
        if sep and name and name not in _PER_CONTAINER_ENV:
            env[name] = value
    return network, env
