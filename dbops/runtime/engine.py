"""The container engine CLI (``podman`` or ``docker``: the same verbs), the containers.conf podman
needs on machines like this one, and the labels every dbops container carries.

Every container carries labels: ``dbops=1``, the run id, the instance name, the creating
process (pid and its start time, so a reused pid does not count) and host name.
:func:`cleanup_stale` removes those whose creating process is gone: a run killed with SIGKILL
leaves a container behind until the next run on this host starts.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from dbops import log, proc
from dbops.errors import CommandError, ConfigError, DbopsError

_log = log.get("runtime.container")

ENGINES = ("podman", "docker")
KILL_TIMEOUT = 30.0  # seconds for `ENGINE kill` (a fraction of a second when the engine is well): a hang fails

LABEL = "dbops"
LABEL_RUN = "dbops.run"
LABEL_NAME = "dbops.name"
LABEL_PID = "dbops.pid"
LABEL_PID_START = "dbops.pid_start"
LABEL_HOST = "dbops.host"

# The settings /work/shared/ENVIRONMENT.md found necessary for podman on VMs like this one:
# cgroupfs (no systemd cgroup delegation), runc, and rlimits PostgreSQL can live with.
CONTAINERS_CONF = """\
# written by dbops (runtime.containers_conf): podman settings for throwaway PostgreSQL containers
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
"""


def ensure_containers_conf(path: str | os.PathLike) -> Path:
    """Write the containers.conf podman needs here to `path` unless a file is already there."""
    p = Path(path)
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        tmp.write_text(CONTAINERS_CONF)
        os.replace(tmp, p)
        log.event(_log, logging.INFO, "wrote containers.conf", path=str(p))
    return p


@dataclass(frozen=True)
class Engine:
    """A container engine CLI (``podman`` or ``docker``) and the environment its calls need."""

    name: str
    env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in ENGINES:
            raise ConfigError(f"unknown container engine {self.name!r}", hint="one of " + ", ".join(ENGINES))

    def run(self, args: Sequence[str], *, timeout: float | None = 120, check: bool = True,
            env: Mapping[str, str] | None = None, what: str | None = None,
            cancel: threading.Event | None = None) -> proc.Result:
        """``ENGINE ARGS`` through proc.run; `what` names the call in errors (default ``ENGINE SUBCOMMAND``)."""
        return proc.run([self.name, *args], env={**self.env, **(env or {})}, timeout=timeout, check=check,
                        what=what or f"{self.name} {args[0]}", cancel=cancel)


# --------------------------------------------------------------------------- labels / stale containers


def process_start(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot, /proc/PID/stat field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def creator_labels(run_id: str, name: str) -> dict[str, str]:
    pid = os.getpid()
    return {LABEL: "1", LABEL_RUN: run_id, LABEL_NAME: name, LABEL_PID: str(pid),
            LABEL_PID_START: process_start(pid) or "", LABEL_HOST: socket.gethostname()}


def creator_alive(labels: Mapping[str, str]) -> bool:
    try:
        pid = int(labels.get(LABEL_PID, ""))
    except ValueError:
        return False
    start = process_start(pid)
    if start is None:
        return False
    return not labels.get(LABEL_PID_START) or labels[LABEL_PID_START] == start


def label_args(labels: Mapping[str, str]) -> list[str]:
    out: list[str] = []
    for k, v in labels.items():
        out += ["--label", f"{k}={v}"]
    return out


def force_remove(engine: Engine, name: str) -> None:
    """Kill and remove a container (and its anonymous volumes) whatever its state; a missing one is fine.

    SIGKILL first, on both engines alike (``podman rm -f`` would send the stop signal and wait,
    ``docker rm -f`` kills): a removed server is gone at once, its data folder left as after a crash.
    """
    try:
        engine.run(["kill", "--signal", "KILL", name], check=False, timeout=KILL_TIMEOUT)
        res = engine.run(["rm", "-f", "-v", name], check=False, timeout=120)
    except CommandError as e:  # the engine did not answer (proc.run stopped it)
        raise DbopsError(f"could not remove container {name}: {e.message}", detail=e.detail,
                         hint=f"check the container engine (`{engine.name} ps`), then remove it by hand: "
                              f"{engine.name} rm -f {name}") from None
    if res.returncode != 0 and "no such container" not in (res.stderr + res.stdout).lower():
        raise DbopsError(f"could not remove container {name}", detail=res.stderr.strip()[-1000:],
                         hint=f"remove it by hand: {engine.name} rm -f {name}")


def cleanup_stale(engine: Engine) -> list[str]:
    """Remove dbops containers on this host whose creating process is gone; returns their names."""
    ids = engine.run(["ps", "-a", "-q", "--filter", f"label={LABEL}=1"], timeout=60).stdout.split()
    if not ids:
        return []
    # check=False: a container may vanish between ps and inspect; inspect still prints the others.
    res = engine.run(["inspect", "--format", "{{.Name}} {{json .Config.Labels}}", *ids], check=False, timeout=60)
    host = socket.gethostname()
    removed: list[str] = []
    for line in res.stdout.splitlines():
        name, _, raw = line.strip().partition(" ")
        try:
            labels = json.loads(raw) or {}
        except json.JSONDecodeError:
            continue
        name = name.lstrip("/")  # docker prints "/name"
        if labels.get(LABEL_HOST) != host or creator_alive(labels):
            continue
        force_remove(engine, name)
        log.event(_log, logging.WARNING, "removed a stale dbops container", container=name,
                  creator_pid=labels.get(LABEL_PID))
        removed.append(name)
    return removed
