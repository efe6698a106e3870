"""A cluster lock's owner record (what the lock object and the host-local lock file hold), who holds
a lock now, and where this user's host-local lock files live. The protocol: :mod:`dbops.storage.lock`."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime

from dbops.errors import NotFoundError
from dbops.storage.base import ObjectStore
from dbops.storage.layout import Layout


def boot_id() -> str:
    """This boot of this host (Linux); empty where unknown."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def iso_utc(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class LockOwner:
    host: str
    pid: int
    command: str
    started: float
    expires: float  # owner's clock; informational (staleness is judged on the server's clock)
    ttl: float
    token: str
    boot_id: str = ""

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LockOwner | None:
        try:
            d = json.loads(data)
            return cls(str(d["host"]), int(d["pid"]), str(d["command"]), float(d["started"]),
                       float(d["expires"]), float(d["ttl"]), str(d["token"]), str(d.get("boot_id", "")))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        return f"{self.command!r} (pid {self.pid} on {self.host}) since {iso_utc(self.started)}"


def read_owner(store: ObjectStore, layout: Layout, name: str) -> LockOwner | None:
    """Who holds the lock now (None when free or unreadable)."""
    try:
        return LockOwner.from_bytes(store.get(layout.lock(name)))
    except NotFoundError:
        return None


def default_local_dir() -> str:
    """A folder of this user's own: /run/lock/dbops for root, else $XDG_RUNTIME_DIR/dbops or
    ~/.dbops/locks (never a file in a world-writable folder another user could plant)."""
    env = os.environ.get("DBOPS_LOCK_DIR")
    if env:
        return env
    if os.geteuid() == 0 and os.path.isdir("/run/lock"):
        return "/run/lock/dbops"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "dbops")
    return os.path.join(os.path.expanduser("~"), ".dbops", "locks")
