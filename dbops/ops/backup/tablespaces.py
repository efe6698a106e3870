"""Tablespaces during `dbops backup`: scratch folders, the base backup's mappings, the WAL's
CREATE TABLESPACE records, and what the throwaway instance may see.

Every tablespace of a run lives in ``<scratch>/tblspc/<OID>``, never at its live location:

* the base backup maps each tablespace there (``--tablespace-mapping=LOCATION=FOLDER``);
* a restored snapshot gets its links pointing there (dbops.repo.restore);
* replaying a ``CREATE TABLESPACE`` makes PostgreSQL (15: ``create_tablespace_directories``
  in tablespace.c) ``chmod`` the recorded absolute location, create ``PG_15_<catversion>``
  in it and link ``pg_tblspc/<OID>`` to it; every later change of that tablespace would be
  written there, which on the primary's host is the live tablespace. So before the server
  starts, the WAL to replay is read (``pg_waldump --rmgr=Tablespace``) for CREATE records, and
  each such location is replaced, for the throwaway server only, by a private scratch folder:
  a bind mount at that path in the container (or in a private mount namespace for engine none);
* a ``DROP TABLESPACE`` replayed removes the contents through the link, i.e. in scratch.

After the server stopped, every link in the copy's pg_tblspc is pointed at its scratch folder
(so pg_checksums and the store read the copy), and the snapshot's tablespaces are recorded
with their names (read from the throwaway server) and original locations.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dbops import log, proc
from dbops.config import Node
from dbops.errors import PreconditionError, ValidationError
from dbops.pg import binaries, waldump
from dbops.pg import conn as pgconn
from dbops.repo.tblspc import TBLSPC_DIR, Tablespace, oid_of_link

_log = log.get("backup.tablespaces")

FOLDER = "tblspc"
_CREATE_RE = re.compile(r'desc: CREATE (\d+) "(.*)"\s*$')
USER_TABLESPACES = ("SELECT oid, spcname, pg_tablespace_location(oid) FROM pg_tablespace "
                    "WHERE spcname NOT IN ('pg_default', 'pg_global') ORDER BY oid")


def query(node: Node) -> list[Tablespace]:
    """The user tablespaces of a running server (in-place ones, with an empty location, left out:
    their contents are inside the data folder)."""
    with pgconn.session(node) as c:
        rows = pgconn.rows(c, USER_TABLESPACES)
    return [Tablespace(int(oid), name, loc) for oid, name, loc in rows if loc]


def names(node: Node) -> dict[int, str]:
    with pgconn.session(node) as c:
        return {int(oid): name for oid, name, _ in pgconn.rows(c, USER_TABLESPACES)}


def _escape(path: str) -> str:
    return path.replace("=", "\\=")


def wal_creates(wal_dir: Path, bin_dir: str | None = None, segments: Sequence[str] | None = None) -> dict[int, str]:
    """{OID: location} of every CREATE TABLESPACE in the WAL segments of wal_dir, or in ``segments``
    there (one pg_waldump per timeline, from its first to its last segment)."""
    out: dict[int, str] = {}
    for segs in waldump.segments_by_timeline(wal_dir, segments):
        res = proc.run([binaries.binary("pg_waldump", bin_dir), "--rmgr=Tablespace", "-p", str(wal_dir),
                        segs[0], segs[-1]], env=waldump.ENV, check=False, timeout=3600, what="pg_waldump")
        for line in res.stdout.splitlines():
            m = _CREATE_RE.search(line)
            if m:
                out[int(m.group(1))] = m.group(2)
        if res.returncode != 0 and not waldump.ended_at_wal_end(res.stderr):
            _log.warning("pg_waldump ended early on %s..%s: %s", segs[0], segs[-1], res.stderr.strip()[-300:])
    return out


@dataclass
class ScratchTablespaces:
    """The tablespaces of one run's scratch copy."""

    root: Path  # the run's scratch folder
    known: dict[int, Tablespace] = field(default_factory=dict)  # in the snapshot the run starts from
    created: dict[int, str] = field(default_factory=dict)  # OID -> location: CREATE records to replay
    current: dict[int, Tablespace] = field(default_factory=dict)  # on the source now (after a failover the
    # new primary may keep a tablespace elsewhere): its location is the one recorded

    def folder(self, oid: int) -> Path:
        return self.root / FOLDER / str(oid)

    def dirs(self) -> dict[int, str]:
        return {oid: str(self.folder(oid)) for oid in self.known}

    def prepare(self, user: str) -> None:
        """Create the scratch folders: the known ones (empty, to be filled by a restore or the base
        backup) and one for each tablespace the WAL creates."""
        (self.root / FOLDER).mkdir(mode=0o700, exist_ok=True)
        proc.chown_to(self.root / FOLDER, user)
        for oid in self.known:
            self.folder(oid).mkdir(mode=0o700, exist_ok=True)
            proc.chown_to(self.folder(oid), user)

    def prepare_created(self, user: str) -> None:
        for oid in self.created:
            d = self.folder(oid)
            if d.exists():  # an OID known from the snapshot, dropped and created again
                raise PreconditionError(f"tablespace OID {oid} is created again in the WAL to replay",
                                        hint="run dbops backup --full")
            d.mkdir(mode=0o700)
            proc.chown_to(d, user)

    def mapping_args(self) -> list[str]:
        """pg_basebackup's --tablespace-mapping for every known tablespace."""
        return [f"--tablespace-mapping={_escape(t.location)}={_escape(str(self.folder(oid)))}"
                for oid, t in sorted(self.known.items())]

    def read_wal(self, wal_dir: Path, user: str, bin_dir: str | None = None) -> None:
        """Find the CREATE TABLESPACE records replay will meet; give each a scratch folder."""
        for oid, loc in wal_creates(wal_dir, bin_dir).items():
            if oid in self.known and self.known[oid].location == loc:
                continue  # created before the snapshot's redo point (the segment starts earlier)
            self.created[oid] = loc
        if self.created:
            log.event(_log, 20, "CREATE TABLESPACE in the WAL to replay; private folders given",
                      tablespaces={str(k): v for k, v in self.created.items()})
        self.prepare_created(user)

    def mounts(self, engine: str) -> tuple[tuple[str, str], ...]:
        """What the throwaway server must see: in a container every scratch folder at its own path
        (the links point there, and there after relink()) and each created one also at its recorded
        location; a local server needs only the latter (a private mount namespace)."""
        own = sorted(set(self.known) | set(self.created))  # after the relink, tools follow links to these
        out = [] if engine == "none" else [(str(self.folder(o)), str(self.folder(o))) for o in own]
        out += [(str(self.folder(o)), loc) for o, loc in sorted(self.created.items())]
        for host, inside in out:
            if ":" in host + inside or "," in host + inside:
                raise PreconditionError(f"tablespace path {inside!r} cannot be mounted (it holds ':' or ',')")
        return tuple(out)

    def relink(self, data: Path) -> None:
        """After the server stopped: every pg_tblspc link points at its scratch folder. A link dbops
        did not give a folder is an error (its contents would be read from a live location)."""
        tdir = data / TBLSPC_DIR
        if not tdir.is_dir():
            return
        for entry in os.scandir(tdir):
            oid = oid_of_link(f"{TBLSPC_DIR}/{entry.name}")
            if not entry.is_symlink():
                continue  # an in-place tablespace: a folder inside the copy
            if oid is None or (oid not in self.known and oid not in self.created):
                raise ValidationError(f"the restored copy has a tablespace link {entry.name} -> "
                                      f"{os.readlink(entry.path)} that replay was not expected to create")
            want = str(self.folder(oid))
            if os.readlink(entry.path) != want:
                os.unlink(entry.path)
                os.symlink(want, entry.path)

    def snapshot(self, data: Path, names_by_oid: dict[int, str]) -> dict[Tablespace, str]:
        """{tablespace: scratch folder} of the stopped copy, for the store."""
        out: dict[Tablespace, str] = {}
        tdir = data / TBLSPC_DIR
        for entry in (os.scandir(tdir) if tdir.is_dir() else ()):
            oid = oid_of_link(f"{TBLSPC_DIR}/{entry.name}")
            if oid is None or not entry.is_symlink():
                continue
            now = self.current.get(oid)
            loc = now.location if now else self.created.get(oid) or self.known[oid].location
            name = names_by_oid.get(oid) or (self.known[oid].name if oid in self.known else str(oid))
            out[Tablespace(oid, name, loc)] = str(self.folder(oid))
        return out
