"""Room for a restore, checked before anything is downloaded: the backup's files need their size
on the filesystem of the target folder, and each tablespace's on the filesystem of its folder
(several on one filesystem are added up), plus a margin for the WAL the recovery brings into
``pg_wal``; and the scratch folder must hold the WAL to replay, which is fetched there before the
server starts (a restore to a point days after its backup replays days of WAL). A restore refused
here has written nothing; one that would only fail after minutes of download (a full disk mid-run
is still reported and cleaned up: :mod:`dbops.ops.restore.run`) is the worse day.
``--no-space-check`` skips it where the filesystem stores less than the files' size (ZFS or btrfs
compression); ``--delta`` reuses files, so only the WAL's room is checked there."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dbops.errors import PreconditionError
from dbops.repo.manifest import FILE, FileEntry
from dbops.repo.tblspc import oid_of_path
from dbops.runtime.scratch import existing_parent, free_bytes
from dbops.units import human_bytes

WAL_MARGIN = 64 * 2**20  # on the target's filesystem: segments recovery copies into pg_wal, and the first new ones


@dataclass
class Need:
    """What one filesystem must hold, and the folders of the restore on it."""

    folders: list[str] = field(default_factory=list)
    bytes: int = 0
    free: int = 0


def needs(entries: Iterable[FileEntry], target: Path, dests: Mapping[int, Path],
          wal: tuple[Path, int] | None = None) -> dict[int, Need]:
    """{device: Need} for the backup's files (``entries``: its listing) restored into target, the
    files under ``pg_tblspc/<OID>/`` into ``dests[OID]``. Each file is counted at its size rounded
    up to its filesystem's block (thousands of small files take whole blocks). ``wal``: (the scratch
    folder the WAL to replay is fetched into, its bytes)."""
    devices: dict[int | None, tuple[int, int]] = {}  # OID -> (device, block size)
    out: dict[int, Need] = {}

    def on(folder: Path, label: str) -> tuple[Path, int, Need]:
        there = existing_parent(folder)
        dev = there.stat().st_dev
        need = out.setdefault(dev, Need(free=free_bytes(there)))
        need.folders.append(label)
        return there, dev, need

    for oid, folder in {None: target, **dests}.items():
        there, dev, _ = on(folder, str(folder) if oid is None else f"{folder} (tablespace OID {oid})")
        devices[oid] = (dev, os.statvfs(there).f_frsize or 4096)
    out[devices[None][0]].bytes += WAL_MARGIN
    if wal is not None and wal[1] > 0:
        _, _, need = on(wal[0], f"{wal[0]} (scratch: the WAL to replay)")
        need.bytes += wal[1]
    for e in entries:
        if e.type != FILE or not e.size:
            continue
        oid = oid_of_path(e.path)
        dev, block = devices[oid if oid in devices else None]
        out[dev].bytes += -(-e.size // block) * block
    return out


def summed(logical_size: int, tablespaces: Iterable[tuple[int, int]]) -> list[FileEntry]:
    """The backup's files as a manifest's header sums them (its size, and each tablespace's (OID,
    size)), for a plan that has not read its entries: one entry for the data folder, one a tablespace."""
    tablespaces = list(tablespaces)
    rest = max(0, logical_size - sum(size for _oid, size in tablespaces))
    return [FileEntry("all", FILE, 0o600, 0, rest),
            *(FileEntry(f"pg_tblspc/{oid}/all", FILE, 0o600, 0, size) for oid, size in tablespaces)]


def shortages(entries: Iterable[FileEntry], target: Path, dests: Mapping[int, Path],
              wal: tuple[Path, int] | None = None) -> str | None:
    """Each filesystem that cannot hold its share of the restore now, said in one line; None: all can."""
    short = [n for n in needs(entries, target, dests, wal).values() if n.bytes > n.free]
    if not short:
        return None
    return "; ".join(f"{' and '.join(n.folders)}: needs {human_bytes(n.bytes)}, {human_bytes(n.free)} free"
                     for n in short)


def check_room(entries: Iterable[FileEntry], target: Path, dests: Mapping[int, Path],
               wal: tuple[Path, int] | None = None) -> None:
    """PreconditionError (exit 11) naming each filesystem that cannot hold its share of the restore."""
    short = shortages(entries, target, dests, wal)
    if short is None:
        return
    raise PreconditionError(
        "not enough free space for the restore: " + short,
        detail=f"the files' sizes, plus {human_bytes(WAL_MARGIN)} on the target's filesystem for the WAL the "
               "recovery brings in" + (f", plus {human_bytes(wal[1])} of WAL to replay in the scratch folder"
                                       if wal and wal[1] > 0 else "") + "; nothing was downloaded or written",
        hint="free space there, or restore to a larger filesystem with --target-dir (--tablespace-map for a "
             "tablespace; backup.scratch_dir for the WAL, or a target time nearer a backup); where the filesystem "
             "compresses what it stores (ZFS, btrfs), --no-space-check skips this check",
    )


def wal_to_fetch(cache: Path, names: Iterable[str], seg_size: int) -> int:
    """Bytes of the segments still to be fetched into the cache (those already there, read by the plan's
    scan of the archive's end or by an earlier attempt, take no more room)."""
    return sum(seg_size for name in names if not (cache / name).exists())
