"""Where `dbops restore` puts each tablespace of the backup.

* ``--tablespace-map NAME=DIR`` (repeatable; the OID works in place of the name) sends one
  tablespace to DIR;
* ``--tablespace-map-all DIR`` sends every tablespace not mapped one by one to ``DIR/<name>``;
* otherwise a tablespace goes back to its original location, but only when that folder is
  absent or empty and no running PostgreSQL server on this host uses it: on the primary's
  own host the original location is the live tablespace.

A folder chosen for a tablespace must be absent or empty (``--force`` empties it, ``--delta``
reuses what is there: the folder a previous restore linked), and never one that a running
server uses. Everything is decided before anything is written: a refusal (exit 11) leaves
the target folder and every tablespace folder as they were.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Sequence

from dbops.errors import PreconditionError, UsageError
from dbops.repo.tblspc import Tablespace, folder_state, locations_in_use

MAP_FLAG = "--tablespace-map"
MAP_ALL_FLAG = "--tablespace-map-all"


@dataclass(frozen=True)
class Destination:
    tablespace: Tablespace
    folder: Path
    how: str  # mapped | map-all | original | reused (the link a --delta folder already has)
    state: str  # absent | empty | not empty (reused by --delta / emptied by --force)
    size: int

    def as_dict(self) -> dict[str, Any]:
        t = self.tablespace
        return {"oid": t.oid, "name": t.name, "original_location": t.location, "folder": str(self.folder),
                "how": self.how, "state": self.state, "size": self.size}


def parse_map(values: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """NAME=DIR (or OID=DIR) pairs from the command line; DIR made absolute."""
    out = []
    for v in values:
        key, sep, folder = v.partition("=")
        if not sep or not key or not folder:
            raise UsageError(f"{MAP_FLAG} {v!r}: expected NAME=DIR (or OID=DIR)",
                             hint=f"e.g. {MAP_FLAG} fast=/srv/restore/fast")
        out.append((key, str(Path(folder).absolute())))
    keys = [k for k, _ in out]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise UsageError(f"{MAP_FLAG} names {', '.join(dup)} more than once")
    return tuple(out)


def _match(t: Tablespace, key: str) -> bool:
    return key == t.name or (key.isdigit() and int(key) == t.oid)


def _existing_link(target_dir: Path, t: Tablespace) -> Path | None:
    link = target_dir / t.link
    return Path(os.readlink(link)) if link.is_symlink() else None


def destinations(tablespaces: Sequence[Tablespace], *, target_dir: Path,
                 mapping: Sequence[tuple[str, str]] = (), map_all: Path | None = None, delta: bool = False,
                 force: bool = False) -> list[Destination]:
    """Where each tablespace goes; PreconditionError (exit 11) for a folder that may not be used."""
    # an OID the backup does not have may name a tablespace created in the WAL replayed after it
    unknown = [k for k, _ in mapping if not k.isdigit() and not any(_match(t, k) for t in tablespaces)]
    if unknown:
        have = ", ".join(f"{t.name} (OID {t.oid})" for t in tablespaces) or "none"
        raise UsageError(f"{MAP_FLAG}: the backup has no tablespace {', '.join(unknown)}",
                         hint=f"its tablespaces: {have}")
    in_use = locations_in_use()
    out: list[Destination] = []
    for t in tablespaces:
        folder, how = None, "original"
        for k, d in mapping:
            if _match(t, k):
                folder, how = Path(d), "mapped"
        if folder is None and map_all is not None:
            folder, how = map_all.absolute() / t.name, "map-all"
        if folder is None and delta and _existing_link(target_dir, t) is not None:
            folder, how = _existing_link(target_dir, t), "reused"
        if folder is None:
            folder = Path(t.location)
        state = folder_state(folder)
        user = in_use.get(os.path.realpath(folder))
        fix = (f"give it another folder: {MAP_FLAG} {t.name}=DIR, or {MAP_ALL_FLAG} DIR "
               f"(each tablespace in DIR/<name>)")
        if user:
            raise PreconditionError(
                f"tablespace {t.name} (OID {t.oid}) would be restored into {folder}, which {user} uses",
                detail="nothing was written", hint=fix)
        if state == "not empty" and not (delta or force):
            where = "its original location" if how == "original" else "the folder given for it"
            raise PreconditionError(
                f"tablespace {t.name} (OID {t.oid}) would be restored into {where} {folder}, which is not empty",
                detail="nothing was written",
                hint=fix if how == "original" else "choose an empty folder, or add --force to replace what is there")
        out.append(Destination(t, folder, how, state, t.size))
    folders = [os.path.realpath(d.folder) for d in out]
    twice = sorted({f for f in folders if folders.count(f) > 1})
    if twice:
        raise PreconditionError(f"two tablespaces would be restored into the same folder {twice[0]}",
                                hint=f"give each its own folder with {MAP_FLAG}")
    inside = [d for d in out if os.path.realpath(d.folder).startswith(os.path.realpath(target_dir) + os.sep)]
    if inside:
        raise PreconditionError(f"tablespace {inside[0].tablespace.name} would be restored inside the target "
                                f"folder ({inside[0].folder})", hint="choose a folder outside the data folder")
    return out


def created_destinations(creates: dict[int, str], known: Sequence[Tablespace], *,
                         mapping: Sequence[tuple[str, str]] = (), map_all: Path | None = None,
                         given: Collection[Path] = ()) -> dict[int, tuple[str, Path]]:
    """Tablespaces a CREATE TABLESPACE in the WAL to replay makes (not in the backup):
    {OID: (recorded location, folder)}. A mapped one (``OID=DIR``, or ``map_all/<OID>``) is
    given its folder in place of the location while recovery runs; an unmapped one uses its
    location, which must be absent or empty and unused (created empty when absent). A folder in
    ``given`` (this replay's, made for an earlier CREATE: the tablespace may be dropped and created
    anew there) is given again unchecked: replay may already have filled it, or still use it."""
    out: dict[int, tuple[str, Path]] = {}
    in_use = locations_in_use()
    have = {t.oid for t in known}
    for oid, loc in sorted(creates.items()):
        if oid in have:
            continue
        folder = next((Path(d) for k, d in mapping if k == str(oid)), None)
        if folder is None and map_all is not None:
            folder = map_all.absolute() / str(oid)
        fix = f"give it a folder: {MAP_FLAG} {oid}=DIR, or {MAP_ALL_FLAG} DIR (it goes to DIR/{oid})"
        check = folder or Path(loc)
        if check in given:
            out[oid] = (loc, check)
            continue
        user = in_use.get(os.path.realpath(check))
        if user:
            raise PreconditionError(f"tablespace OID {oid}, created after the backup at {loc} (in the WAL replayed "
                                    f"to the target), would be restored into {check}, which {user} uses",
                                    hint=fix)
        if folder_state(check) == "not empty":
            raise PreconditionError(f"tablespace OID {oid}, created after the backup at {loc} (in the WAL replayed "
                                    f"to the target), would be restored into {check}, which is not empty",
                                    hint=fix)
        out[oid] = (loc, folder or Path(loc))
    return out
