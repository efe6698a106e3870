"""Tablespaces in a snapshot: what the manifest records and where their contents live.

A user tablespace is a symlink ``pg_tblspc/<OID>`` in the data folder pointing at a folder
elsewhere (its *location*, e.g. ``/mnt/fast/ts1``), which holds ``PG_15_<catversion>/...``.
In a manifest:

* ``tablespaces`` lists each one: ``oid``, ``name`` and the original ``location``;
* the link itself is a ``symlink`` entry ``pg_tblspc/<OID>`` whose target is that location;
* the tablespace's contents are ordinary entries under ``pg_tblspc/<OID>/...``, chunked and
  deduplicated like every other file.

A restore never writes through the recorded target: every tablespace is given a folder
(mapped by the user, or its original location when that is safe), the link is created
pointing there, and the entries under ``pg_tblspc/<OID>/`` are written into that folder.
What comes from the bucket is untrusted: OIDs must be numbers, each link entry must belong to
a listed tablespace, and nothing but a listed tablespace's link lives directly in pg_tblspc.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dbops import log
from dbops.errors import PreconditionError, ValidationError

if TYPE_CHECKING:
    from dbops.repo.manifest import FileEntry, Manifest

_log = log.get("backup.tblspc")

TBLSPC_DIR = "pg_tblspc"
_OID_RE = re.compile(r"^[1-9][0-9]{0,9}$")


@dataclass(frozen=True)
class Tablespace:
    oid: int
    name: str
    location: str  # the original absolute location (as PostgreSQL recorded it)
    size: int = 0  # bytes of its files in the backup (set when stored)

    @property
    def link(self) -> str:
        """The link's path in the data folder."""
        return f"{TBLSPC_DIR}/{self.oid}"

    def to_dict(self) -> dict[str, Any]:
        return {"oid": self.oid, "name": self.name, "location": self.location, "size": self.size}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Tablespace":
        try:
            oid = int(d["oid"])
            name, location, size = str(d["name"]), str(d["location"]), int(d.get("size", 0))
        except (KeyError, TypeError, ValueError) as e:
            raise ValidationError(f"manifest lists a tablespace it does not describe: {e}") from None
        if not _OID_RE.match(str(oid)) or not location.startswith("/") or "\0" in location + name:
            raise ValidationError(f"manifest lists an invalid tablespace (oid {oid!r}, location {location!r})")
        return cls(oid, name, location, size)


def oid_of_link(path: str) -> int | None:
    """The OID when path is ``pg_tblspc/<OID>`` exactly, else None."""
    head, _, tail = path.partition("/")
    if head != TBLSPC_DIR or not _OID_RE.match(tail):
        return None
    return int(tail)


def oid_of_path(path: str) -> int | None:
    """The OID of the tablespace an entry lives in (``pg_tblspc/<OID>/...``), else None."""
    parts = path.split("/", 2)
    if len(parts) >= 2 and parts[0] == TBLSPC_DIR and _OID_RE.match(parts[1]):
        return int(parts[1])
    return None


def check_entry(known: set[int], path: str, kind: str) -> None:
    """An entry inside pg_tblspc/<OID>/ belongs to a listed tablespace, whose own entry is its
    link. (A bare link of an unlisted tablespace is what manifests written before tablespace
    support hold: a restore leaves it out.)"""
    if not path.startswith(TBLSPC_DIR + "/"):
        return
    oid = oid_of_path(path)
    if oid is not None and oid not in known and path == f"{TBLSPC_DIR}/{oid}" and kind == "symlink":
        return
    if oid is None or oid not in known:
        raise ValidationError(f"manifest entry {path} is not part of a listed tablespace",
                              hint="the manifest is damaged or was not written by dbops")
    if path == f"{TBLSPC_DIR}/{oid}" and kind != "symlink":
        raise ValidationError(f"manifest entry {path} must be a tablespace link, not a {kind}")


def check_entries(tablespaces: Iterable[Tablespace], entries: Iterable[tuple[str, str]]) -> None:
    """check_entry for every (path, type)."""
    known = {t.oid for t in tablespaces}
    for path, kind in entries:
        check_entry(known, path, kind)


def sizes(tablespaces: Iterable[Tablespace], files: Iterable[Any]) -> dict[int, int]:
    """Bytes of file content per tablespace OID (files: manifest FileEntry-like with path, size)."""
    out = {t.oid: 0 for t in tablespaces}
    if not out:
        return out  # nothing to look for: the files are not read
    for f in files:
        oid = oid_of_path(f.path)
        if oid in out and f.path.count("/") >= 2:
            out[oid] += f.size
    return out


def folder_state(path: Path) -> str:
    """'absent', 'empty' or 'not empty' (a file there counts as not empty)."""
    try:
        with os.scandir(path) as it:
            return "not empty" if any(True for _ in it) else "empty"
    except FileNotFoundError:
        return "absent"
    except NotADirectoryError:
        return "not empty"


def locations_in_use() -> dict[str, str]:
    """Tablespace folders used by PostgreSQL servers running on this host: {real path: what uses it}.

    Every postmaster's working folder is its data folder (PostgreSQL changes into it); the
    links in its pg_tblspc are the tablespaces it uses. Processes this user may not inspect
    are skipped (a live location is never empty, so the emptiness rule still protects it)."""
    out: dict[str, str] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
            if exe not in ("postgres", "postmaster"):
                continue
            data = os.readlink(f"/proc/{pid}/cwd")
            tdir = os.path.join(data, TBLSPC_DIR)
            for name in os.listdir(tdir):
                p = os.path.join(tdir, name)
                out.setdefault(os.path.realpath(p), f"PostgreSQL pid {pid} on {data}")
        except OSError:
            continue
    return out


# --------------------------------------------------------------------------- restoring


def tablespace_folders(manifest: "Manifest", dirs: Mapping[int, str] | None) -> dict[int, Path]:
    """{OID: folder} for every tablespace the backup lists; PreconditionError when one has none."""
    dirs = dirs or {}
    missing = [t for t in manifest.tablespaces if t.oid not in dirs]
    if missing:
        raise PreconditionError(
            "no folder given for tablespace " + ", ".join(f"{t.name} (OID {t.oid})" for t in missing),
            hint="every tablespace of the backup needs a folder to be restored into")
    return {t.oid: Path(dirs[t.oid]).absolute() for t in manifest.tablespaces}


def link_tablespaces(target: Path, manifest: "Manifest", dests: Mapping[int, Path]) -> None:
    """pg_tblspc/<OID> -> its folder, for every listed tablespace (before anything is written inside)."""
    if not manifest.tablespaces:
        return
    (target / TBLSPC_DIR).mkdir(mode=0o700, exist_ok=True)
    for t in manifest.tablespaces:
        link = target / t.link
        if link.is_symlink() and os.readlink(link) == str(dests[t.oid]):
            continue
        if link.is_symlink():
            link.unlink()
        os.symlink(str(dests[t.oid]), link)


def restored_links(manifest: "Manifest") -> list["FileEntry"]:
    """The symlink entries a restore creates as recorded: not tablespace links (those point at the
    folder chosen for the tablespace), and not links to tablespaces the manifest does not list
    (written before tablespace support; their contents were never backed up)."""
    out = []
    for e in manifest.listing():
        if e.type != "symlink":
            continue
        if oid_of_link(e.path) is not None:
            if not any(t.link == e.path for t in manifest.tablespaces):
                _log.warning("backup %s has a link %s -> %s without the tablespace's contents; left out",
                             manifest.backup_id, e.path, e.target)
            continue
        out.append(e)
    return out


def finish_tablespace_roots(dests: Mapping[int, Path], ids: tuple[int, int] | None) -> None:
    """Each tablespace folder: mode 0700 (PostgreSQL checks it), the owner, fsynced."""
    for d in dests.values():
        if ids:
            os.chown(d, *ids)
        os.chmod(d, 0o700)
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
