"""Backup storage engine: content-addressed chunks in packs, manifests, catalog, retention.

Public entry points (the backup workflow in dbops/ops builds on these):

* :func:`store.store_snapshot` - a stopped data folder into packs + a manifest;
* :func:`restore.restore_snapshot` / :func:`restore.verify_backup`;
* :mod:`catalog` - list backups by time, status records, backup ids;
* :mod:`retention` - plan and execute retention.
"""

from dbops.repo.catalog import (
    BackupInfo,
    StatusRecord,
    list_backups,
    new_backup_id,
    newest_usable,
)
from dbops.repo.manifest import ChunkRef, FileEntry, Manifest, PgState, load, save
from dbops.repo.restore import (
    RestoreStats,
    VerifyReport,
    restore_snapshot,
    verify_backup,
)
from dbops.repo.store import store_snapshot

__all__ = [
    "BackupInfo", "ChunkRef", "FileEntry", "Manifest", "PgState", "RestoreStats", "StatusRecord", "VerifyReport",
    "list_backups", "load", "new_backup_id", "newest_usable", "restore_snapshot", "save", "store_snapshot",
    "verify_backup",
]
