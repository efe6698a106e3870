"""Every object key dbops writes, named in one place.

Everything lives under ``<prefix>/dbops-v1/`` so a future format can sit beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

from dbops.pg.lsn import BACKUP_LABEL_RE, HISTORY_RE, PARTIAL_RE, SEGMENT_RE

FORMAT = "dbops-v1"


@dataclass(frozen=True)
class Layout:
    prefix: str = ""

    @property
    def root(self) -> str:
        p = self.prefix.strip("/")
        return f"{p}/{FORMAT}/" if p else f"{FORMAT}/"

    # -- identity of the cluster that owns this archive
    def identity(self) -> str:
        return self.root + "identity.json"

    # -- WAL archive
    def wal_prefix(self, timeline: int | None = None) -> str:
        if timeline is None:
            return self.root + "wal/"
        return self.root + f"wal/{timeline:08X}/"

    def wal_key(self, name: str) -> str:
        """Segments, .partial and .backup files under their timeline; history files apart."""
        if HISTORY_RE.match(name):
            return self.root + f"wal/history/{name}"
        if SEGMENT_RE.match(name) or PARTIAL_RE.match(name) or BACKUP_LABEL_RE.match(name):
            return self.root + f"wal/{name[:8]}/{name}"
        raise ValueError(f"not a WAL file name: {name!r}")

    def wal_name_of(self, key: str) -> str | None:
        """The WAL file name a listed key holds, only when the key is exactly where dbops stores that
        name (listings come from the bucket: anything else under wal/ is ignored, never parsed)."""
        name = key.rsplit("/", 1)[-1]
        try:
            expected = self.wal_key(name)
        except ValueError:
            return None
        if key != expected or (not HISTORY_RE.match(name) and name[:8] == "00000000"):
            return None
        return name

    def history_prefix(self) -> str:
        return self.root + "wal/history/"

    # -- backups
    def backups_prefix(self) -> str:
        return self.root + "backups/"

    def backup_prefix(self, backup_id: str) -> str:
        return self.root + f"backups/{backup_id}/"

    def manifest(self, backup_id: str) -> str:
        """Written last: a backup without its manifest does not exist."""
        return self.backup_prefix(backup_id) + "manifest.json.zst"

    def relation_map(self, backup_id: str) -> str:
        """Which relfilenodes were which tables, read when the backup was validated (restore --before-drop)."""
        return self.backup_prefix(backup_id) + "relmap.json.zst"

    def status_prefix(self, backup_id: str) -> str:
        return self.backup_prefix(backup_id) + "status/"

    def status(self, backup_id: str, seq: str) -> str:
        return self.status_prefix(backup_id) + f"{seq}.json"

    # -- content-addressed chunk packs
    def packs_prefix(self) -> str:
        return self.root + "packs/"

    def pack(self, pack_id: str) -> str:
        return self.root + f"packs/{pack_id[:2]}/{pack_id}.pack"

    def pack_index(self, pack_id: str) -> str:
        return self.root + f"packs/{pack_id[:2]}/{pack_id}.idx"

    # -- locks and probes
    def lock(self, name: str) -> str:
        return self.root + f"locks/{name}.lock"

    def lock_takeover(self, name: str, generation: str) -> str:
        """Claimed (if_absent) by the one process allowed to replace an expired lock generation."""
        return self.root + f"locks/{name}.takeover/{generation}"

    def probe(self, token: str) -> str:
        return self.root + f"probe/{token}"
