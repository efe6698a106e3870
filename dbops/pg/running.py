"""Which data folders PostgreSQL servers on this host are running on.

Every PostgreSQL server process changes its working directory to its data folder, so
``/proc/PID/cwd`` of a process named ``postgres`` names it (readable for our own processes, and
for all of them as root). Where that link cannot be read, the postmaster's ``-D`` argument is
used. A ``postmaster.pid`` with a live pid in a folder or one of its parents counts as well
(servers started in ways /proc does not show, e.g. by another user while we are not root).

Used to refuse a restore whose target contains, equals or lies inside a running cluster's folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from dbops.proc import pid_alive

PROC = Path("/proc")


def _data_dir_of(pid_dir: Path) -> Path | None:
    try:
        return Path(os.readlink(pid_dir / "cwd"))
    except OSError:
        pass
    try:  # the postmaster keeps its command line: postgres -D DIR ...
        argv = (pid_dir / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    for i, a in enumerate(argv[:-1]):
        if a == b"-D" and argv[i + 1].startswith(b"/"):
            return Path(os.fsdecode(argv[i + 1]))
    return None


def _postgres_processes() -> list[Path]:
    """/proc entries of this host's processes named ``postgres`` (postmasters and their children)."""
    try:
        entries = list(PROC.iterdir())
    except OSError:
        return []
    out = []
    for d in entries:
        if not d.name.isdigit():
            continue
        try:
            if (d / "comm").read_text().strip() == "postgres":
                out.append(d)
        except OSError:
            continue
    return out


def running_data_dirs() -> dict[Path, int]:
    """{data folder (resolved): a pid of a server running on it} for this host's PostgreSQL servers."""
    found: dict[Path, int] = {}
    for d in _postgres_processes():
        data = _data_dir_of(d)
        if data is None or not (data / "PG_VERSION").exists():
            continue
        pid = int(d.name)
        key = data.resolve()
        found[key] = min(found.get(key, pid), pid)
    return found


def live_pid_file(folder: Path) -> int | None:
    """The pid in folder/postmaster.pid when that process is alive."""
    try:
        pid = int((folder / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if pid > 0 and pid_alive(pid) else None


def cluster_in_the_way(target: Path) -> tuple[Path, int, str] | None:
    """(data folder, pid, how) of a running cluster that `target` is, contains or lies inside; else None."""
    t = target.resolve()
    for data, pid in sorted(running_data_dirs().items()):
        if data == t:
            return data, pid, "is"
        if t in data.parents:
            return data, pid, "contains"
        if data in t.parents:
            return data, pid, "lies inside"
    for folder in (t, *t.parents):
        pid = live_pid_file(folder)
        if pid:
            return folder, pid, "is" if folder == t else "lies inside"
    return None


def postmasters_naming(folder: Path) -> list[int]:
    """Pids of this host's PostgreSQL postmasters whose command line names a path inside `folder`
    (a throwaway server dbops started: its ``-D``, socket folder, hba file or restore_command lie
    in the run's scratch folder). Child processes rewrite their command line, so only postmasters match."""
    needle = os.fsencode(str(folder.resolve())) + b"/"
    found: list[int] = []
    for d in _postgres_processes():
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(needle in a or a == needle[:-1] for a in argv):
            found.append(int(d.name))
    return sorted(found)
