"""The scratch folder where a throwaway copy of a backup is restored and started.

The policy: one folder per run (``run-PID-RUNID``), owned by PostgreSQL's OS user and removed
when the run ends; folders of runs killed with SIGKILL are removed by the next run; a run
refuses to start when the folder's filesystem cannot hold the copy, and a disk that fills up
mid-run is reported as that (ENOSPC), not as a broken backup. The folder itself is checked
(dbops.fsafe): another local user cannot have created it first or made it a link.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import signal
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from dbops import log, proc
from dbops.errors import DbopsError, PreconditionError
from dbops.fsafe import private_dir
from dbops.pg import running
from dbops.units import human_bytes

SCRATCH_PREFIX = "run-"
SCRATCH_MARGIN = 256 * 2**20  # WAL replayed into the copy, the server's own files
NO_SPACE = "No space left on device"  # strerror(ENOSPC), as programs and PostgreSQL's log print it
# A server's dynamic shared memory (/dev/shm) full: ENOSPC's words, but not the scratch disk's
# (ops.backup.environment names it as the environment's cause).
SHARED_MEMORY_FULL = re.compile(r"could not (resize|allocate) shared memory segment", re.I)

_log = log.get("runtime")


def clean_stale_scratch(scratch_root: Path) -> list[str]:
    """Remove scratch folders of runs whose process is gone (a run killed with SIGKILL)."""
    removed: list[str] = []
    if not scratch_root.is_dir():
        return removed
    for d in scratch_root.iterdir():
        if not d.name.startswith(SCRATCH_PREFIX):
            continue
        try:
            pid = int(d.name[len(SCRATCH_PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not proc.pid_alive(pid):
            stop_left_servers(d)
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    return removed


def stop_left_servers(folder: Path, timeout: float = 30.0) -> list[int]:
    """Stop (immediate shutdown: SIGQUIT, then SIGKILL) the PostgreSQL servers a killed run started
    with its settings in `folder`: a restore's server on its target, a local validation server.
    Nothing of theirs is kept: a restore killed mid-way is done again (--force or --delta)."""
    pids = running.postmasters_naming(folder)
    for pid in pids:
        log.event(_log, logging.WARNING, "stopping a PostgreSQL server left running by a killed dbops run",
                  server_pid=pid, folder=str(folder))
        for sig, wait in ((signal.SIGQUIT, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            except PermissionError:
                log.event(_log, logging.ERROR, "cannot stop it: not allowed", server_pid=pid)
                break
            deadline = time.monotonic() + wait
            while proc.pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not proc.pid_alive(pid):
                break
    return pids


@contextmanager
def scratch_folder(root: Path, run_id: str, owner: str, *, removals: list[threading.Thread] | None = None,
                   after: list[Callable[[], None]] | None = None) -> Iterator[Path]:
    """This run's own folder under root, owned by PostgreSQL's OS user (owner), removed at the end.
    root must be this user's, root's or owner's, writable by no one else and not a link
    (0755: the throwaway instance's user must reach its run folder inside).

    ``removals``: the folder is removed in a thread appended there, which the caller joins before
    it ends (see :func:`join_removals`): a copy of the database takes a while to unlink, and the run
    has other work (its status record, retention) meanwhile. A run killed before that leaves it to
    the next run's :func:`clean_stale_scratch`.

    ``after``: what the caller appends there runs once the folder is gone (in that thread with
    ``removals``), a failure logged: the container of a throwaway server stopped on the copy, whose
    removal syncs what the copy would still have dirty (see :mod:`dbops.runtime.container`)."""
    private_dir(root, create=True, mode=0o755, also_user=owner)
    d = root / f"{SCRATCH_PREFIX}{os.getpid()}-{run_id}"
    d.mkdir(mode=0o700)
    proc.chown_to(d, owner)
    try:
        yield d
    finally:
        if removals is None:
            shutil.rmtree(d, ignore_errors=True)
            run_after(after or [])
        else:  # renamed first: the name is free again at once (a healing full backup takes it)
            gone = d.with_name(d.name + "-removing")
            try:
                d.rename(gone)
            except OSError:
                gone = d

            def remove() -> None:
                remove_tree(gone)
                run_after(after or [])

            t = threading.Thread(target=remove, name="dbops-scratch-removal")
            t.start()
            removals.append(t)


def run_after(after: list[Callable[[], None]]) -> None:
    """Each of ``after`` in turn (see scratch_folder); a failure is logged, the others still run."""
    while after:
        f = after.pop(0)
        try:
            f()
        except Exception as e:  # noqa: BLE001  the run's work is done; say what is left behind
            log.event(_log, logging.WARNING, "could not clean up after the scratch folder",
                      error=getattr(e, "message", None) or str(e), hint=getattr(e, "hint", None))


LARGE_FILE = 16 * 2**20  # unlinked by the threads of remove_tree


def remove_tree(path: Path, workers: int = 2) -> None:
    """shutil.rmtree(path) (errors ignored), its regular files of ``LARGE_FILE`` bytes or more
    unlinked first by ``workers`` threads, largest first: a file's pages leave the page cache as it
    is unlinked, on the thread that unlinks it (a 6.3 GB copy of a database: 1.5-1.6 s on one
    thread, 1.05-1.3 s on two). Each file is unlinked by name relative to its folder, opened
    without following links (``os.fwalk``): nothing outside path is ever touched."""
    big: list[tuple[int, int, str]] = []  # (size, folder fd, name)
    fds: list[int] = []
    try:
        for _, _, files, dirfd in os.fwalk(path, follow_symlinks=False):
            held = None
            for name in files:
                try:
                    st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and st.st_size >= LARGE_FILE:
                    if held is None:
                        held = os.dup(dirfd)
                        fds.append(held)
                    big.append((st.st_size, held, name))
        big.sort(reverse=True)
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="dbops-unlink") as pool:
            for _ in pool.map(lambda b: _unlink_quietly(b[2], b[1]), big):
                pass
    except OSError:
        pass  # rmtree below does what is left
    finally:
        for fd in fds:
            os.close(fd)
    shutil.rmtree(path, ignore_errors=True)


def _unlink_quietly(name: str, dirfd: int) -> None:
    try:
        os.unlink(name, dir_fd=dirfd)
    except OSError:
        pass


def join_removals(removals: list[threading.Thread]) -> None:
    """Wait for the scratch folders being removed in the background (see scratch_folder)."""
    while removals:
        removals.pop().join()


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def existing_parent(folder: Path) -> Path:
    """The folder, or its nearest existing parent (a folder not made yet is on its parent's filesystem)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def memory_available(proc_root: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> int | None:
    """The memory the kernel could give this process without swapping (``MemAvailable`` in
    /proc/meminfo, bytes: the page cache it can take back included), capped by its memory cgroup's
    limit (a container's or a pod's: the page cache its writes dirty is charged there, whatever the
    host has); None where neither says."""
    available = None
    try:
        with open(f"{proc_root}/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    limit = cgroup_memory_limit(proc_root, cgroup_root)
    if limit is not None and (available is None or limit < available):
        return limit
    return available


UNLIMITED = 1 << 60  # a cgroup v1 limit this large (9223372036854771712 by default) is no limit


def cgroup_memory_limit(proc_root: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> int | None:
    """The memory limit of this process' cgroup, its parents' included (v2: the lowest ``memory.max``
    from its folder up; v1: ``hierarchical_memory_limit`` in ``memory.stat``, else
    ``memory.limit_in_bytes``); None when unlimited or unknown."""
    try:
        lines = Path(proc_root, "self/cgroup").read_text().splitlines()
    except OSError:
        return None
    v2 = v1 = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "memory" in parts[1].split(","):
            v1 = parts[2]
    limits: list[int] = []
    if v1 is not None:
        folder = Path(cgroup_root, "memory", v1.lstrip("/"))
        text = _read(folder / "memory.stat")
        for line in (text or "").splitlines():
            if line.startswith("hierarchical_memory_limit "):
                limits.append(_number(line.split()[1]))
                break
        else:
            limits.append(_number(_read(folder / "memory.limit_in_bytes")))
    elif v2 is not None and Path(cgroup_root, "cgroup.controllers").exists():
        folder = Path(cgroup_root, v2.lstrip("/"))
        while True:
            limits.append(_number(_read(folder / "memory.max")))
            if folder == Path(cgroup_root) or Path(cgroup_root) not in folder.parents:
                break
            folder = folder.parent
    known = [n for n in limits if 0 < n < UNLIMITED]
    return min(known) if known else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _number(text: str | None) -> int:
    """A limit file's value; "max", missing or unreadable: unlimited."""
    try:
        return int(text) if text and text != "max" else UNLIMITED
    except ValueError:
        return UNLIMITED


def copy_stays_cached(data_size: int, available: int | None = None) -> bool:
    """Whether a scratch copy of data_size bytes is left in the page cache as it is written (its server's
    replay, checks and ``pg_checksums`` then read it from memory), or written back and dropped as it
    goes (:func:`dbops.repo.restore.restore_snapshot`'s ``drop_cache``): dropped when it is larger than
    the memory available. A copy that size cannot stay cached until the checks read it (they read it
    from its start, which is evicted first), and writing it into the cache only evicts the host's
    other cache (the primary's own, on a shared host) and meets the kernel's dirty limit, which
    throttles every writer. A smaller copy is kept: at pgbench scale 1000 (15.7 GB, 22 GiB
    available), dropping it made the download 11 s shorter but the checks and ``pg_checksums``,
    reading it back from the disk, 17 s longer (docs/backups.md). ``available``: the memory to
    compare with (default: :func:`memory_available`; unknown: kept, as before)."""
    if available is None:
        available = memory_available()
    return available is None or data_size <= available


def scratch_needed(data_size: int) -> int:
    """What a run needs in the scratch folder for a copy of data_size bytes."""
    return int(data_size * 1.1) + SCRATCH_MARGIN


def tree_bytes(root: Path) -> int:
    """Bytes the files under root occupy (what counts against an emptyDir's sizeLimit)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total


def room_beside_copy(scratch_root: Path, data_size: int, limit: int | None, spool: int) -> int:
    """Bytes the scratch folder can still give to something optional (the incremental's side file
    of saved pages) beyond what a run needs: the copy of data_size bytes with its 10 % and WAL margin
    (:func:`scratch_needed`) and ``spool`` (the store's packs being written); within the free space
    and, with ``limit`` (backup.scratch_limit, a cap the filesystem does not show), within it too."""
    room = free_bytes(scratch_root)
    if limit is not None:
        room = min(room, limit - tree_bytes(scratch_root))
    return max(0, room - scratch_needed(data_size) - spool)


def check_scratch_space(scratch_root: Path, data_size: int, limit: int | None = None, *, owner: str) -> None:
    """Refuse before any work when the scratch folder cannot hold the copy (exit 11).

    ``limit`` (backup.scratch_limit): a cap the filesystem does not show, such as a Kubernetes
    emptyDir's sizeLimit (the kubelet evicts the pod beyond it); what the folder holds counts."""
    private_dir(scratch_root, create=True, mode=0o755, also_user=owner)
    free, needed = free_bytes(scratch_root), scratch_needed(data_size)
    if limit is not None:
        used = tree_bytes(scratch_root)
        if limit - used < needed:
            raise PreconditionError(
                f"backup.scratch_limit is too small: {human_bytes(limit)} allowed in {scratch_root} "
                f"({human_bytes(used)} in use), about {human_bytes(needed)} needed",
                detail=f"limit {limit} bytes, in use {used} bytes; needed {needed} bytes = the data to restore "
                       f"({data_size} bytes) + 10 % + {human_bytes(SCRATCH_MARGIN)} for the WAL replayed into it; "
                       "nothing was done",
                hint="raise the scratch volume's size (a Kubernetes emptyDir's sizeLimit) and backup.scratch_limit "
                     "with it",
            )
    if free < needed:
        raise PreconditionError(
            f"not enough free space in the scratch folder {scratch_root}: {human_bytes(free)} free, "
            f"about {human_bytes(needed)} needed",
            detail=f"free {free} bytes; needed {needed} bytes = the data to restore ({data_size} bytes) + 10 % "
                   f"+ {human_bytes(SCRATCH_MARGIN)} for the WAL replayed into it; nothing was done",
            hint="free space there, or point backup.scratch_dir at a larger filesystem",
        )


# strerror(ENOSPC) and strerror(EDQUOT), as C programs and PostgreSQL's log print them; Go's (podman,
# docker) in lower case
DISK_FULL = re.compile(re.escape(NO_SPACE) + "|Disk quota exceeded", re.I)


def disk_full_lines(text: str) -> list[str]:
    """The lines of a log or error text that name a full disk (ENOSPC, EDQUOT), not a full /dev/shm."""
    return [line for line in text.splitlines() if DISK_FULL.search(line) and not SHARED_MEMORY_FULL.search(line)]


def out_of_space(e: BaseException) -> bool:
    """Did e come from a full disk (ENOSPC, or EDQUOT: a quota), directly or as a program's or
    PostgreSQL's message?"""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(e, DbopsError):
        texts = [t or "" for t in (e.message, e.detail, getattr(e, "stderr", None))]
        return any(DISK_FULL.search(t) for t in texts) and not any(SHARED_MEMORY_FULL.search(t) for t in texts)
    return False


def error_text(e: BaseException) -> str:
    """An error's message and detail (a dbops error's), or its text: the cause quoted under a full disk."""
    return e.message + ("\n" + e.detail if e.detail else "") if isinstance(e, DbopsError) else str(e)


def scratch_full_error(scratch_root: Path, phase: str | None, e: BaseException) -> DbopsError:
    """The one message for a scratch folder that filled up mid-run (the run's own folder is already gone)."""
    cause = error_text(e)
    try:
        free = f"{human_bytes(free_bytes(scratch_root))} free there now"
    except OSError:
        free = "free space unknown"
    return DbopsError(
        f"the scratch folder {scratch_root} ran out of space (ENOSPC: {NO_SPACE})"
        + (f" during phase {phase}" if phase else ""),
        detail=f"{free}; this run's scratch folder and container were removed, nothing was stored and no "
               f"backup was marked failed\n" + cause[-1500:],
        hint="free space there (other files may have filled it), or point backup.scratch_dir at a larger "
             "filesystem, then run again",
    )
