"""The node-controller protocol: what the workflows need from a node, wherever it runs, and the
values it answers with. The shell-based implementation every controller shares is
:class:`dbops.nodes.base.ShellController`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from dbops import proc
from dbops.config import Node
from dbops.pg.controldata import ControlData

STOP_MODES = ("smart", "fast", "immediate")


@dataclass(frozen=True)
class Fence:
    """What :meth:`NodeController.fence_as_standby` changed: the previous postgresql.auto.conf (None:
    there was none), and the postmaster that ran when the fence was in place (None: none ran)."""

    saved_auto_conf: str | None
    postmaster: str | None


@dataclass(frozen=True)
class RunState:
    running: bool
    pid: int | None = None


@runtime_checkable
class NodeController(Protocol):
    """What the workflows need from a node, wherever it runs."""

    node: Node

    def start(self, *, timeout: float = 120.0) -> None:
        """Start the server and wait until it accepts connections (a standby: until it is consistent)."""
        ...

    def stop(self, mode: str = "fast", *, timeout: float = 120.0) -> None:
        """Stop the server (smart | fast | immediate) and wait until the postmaster has exited."""
        ...

    def restart(self, mode: str = "fast", *, timeout: float = 120.0) -> None:
        ...

    def fence(self, mode: str = "fast", *, timeout: float = 120.0) -> ControlData:
        """Stop the server; return its control data once the shutdown checkpoint is on disk.

        From then on the server writes no WAL, though its postmaster may still be exiting
        (archiving the last segment, waiting for walsenders): call :meth:`stop` before
        touching the data folder.
        """
        ...

    def status(self) -> RunState:
        ...

    def is_running(self) -> bool:
        ...

    def promote(self, *, timeout: float = 60.0) -> None:
        """Promote a standby with pg_ctl promote, waiting for the end of recovery."""
        ...

    def controldata(self) -> ControlData:
        """pg_controldata of the node's data folder (works while the server is stopped)."""
        ...

    def write_standby_config(self, primary_conninfo: str, slot: str | None) -> None:
        """standby.signal plus primary_conninfo / primary_slot_name in postgresql.auto.conf (server stopped)."""
        ...

    def remove_standby_signal(self) -> None:
        ...

    def add_standby_signal(self) -> None:
        """Leave standby.signal in the data folder (a fenced primary then starts as a standby)."""
        ...

    def clear_stale_pidfile(self) -> str | None:
        """Remove a postmaster.pid left by a crash (no live postmaster of this folder has that pid)."""
        ...

    def fence_as_standby(self, primary_conninfo: str, slot: str | None) -> Fence:
        """Durably turn a stopped (or still exiting) primary into a standby of another node: any later
        start, by anyone, comes up in recovery. Returns what :meth:`unfence` needs, and the
        postmaster found running once the fence was in place (see :class:`Fence`)."""
        ...

    def unfence(self, fence: Fence) -> None:
        """Undo :meth:`fence_as_standby` (server stopped): standby.signal removed, auto.conf restored."""
        ...

    def read_file(self, rel: str) -> str | None:
        """A file of the data folder, or None when it does not exist."""
        ...

    def write_file(self, rel: str, text: str) -> None:
        ...

    def remove_file(self, rel: str) -> None:
        ...

    def has_standby_signal(self) -> bool:
        ...

    def postmaster(self) -> str | None:
        """The identity (pid, start time) of the postmaster named in postmaster.pid, or None."""
        ...

    def rewind(self, source_conninfo: str, *, password: str | None = None, restore_target_wal: bool = False,
               timeout: float = 3600.0) -> proc.Result:
        """pg_rewind the (stopped) data folder onto the source server's timeline; its output (``--progress``)."""
        ...

    def waldump(self, *args: str, timeout: float = 300.0) -> proc.Result:
        """pg_waldump over the node's pg_wal (``-p`` added; TZ=UTC, LANG=C); never raises for its exit status."""
        ...

    def setting(self, name: str) -> str:
        """A server setting as the configuration files give it (``postgres -C``; server stopped)."""
        ...

    def run(self, argv: Sequence[str], *, timeout: float | None = 300.0, input: str | None = None,
            env: Mapping[str, str] | None = None, check: bool = True) -> proc.Result:
        """Run a command on the node as the data folder's owner."""
        ...
