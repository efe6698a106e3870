"""What `dbops backup` returns (:class:`BackupResult`, printed by ``--json``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dbops.ops.backup.validate import Validation, restore_seconds
from dbops.pg.lsn import format_lsn
from dbops.repo import manifest as mf


@dataclass
class BackupResult:
    backup_id: str
    kind: str  # full | incremental
    parent_id: str | None
    run_id: str
    validated: Validation | None
    manifest: mf.Manifest
    timings: dict[str, float]
    healed_after: str | None = None  # set when this full backup healed a failed validation
    pruned: dict[str, Any] | None = None  # what backup.retention.auto removed after this backup
    s3_requests: dict[str, Any] | None = None  # requests this run sent to the store (S3 bills per request)

    def as_dict(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "ok": True,
            "backup_id": self.backup_id,
            "kind": self.kind,
            "parent_id": self.parent_id,
            "run_id": self.run_id,
            "consistent_lsn": format_lsn(m.pg.consistent_lsn),
            "consistent_time": m.pg.consistent_time,
            "timeline": m.pg.timeline,
            "logical_size": m.logical_size,
            "stored_bytes": m.stored_bytes,
            "counts": m.counts,
            "timings": self.timings,
            "validated": None if self.validated is None else {
                "backup_id": self.validated.backup_id, "ok": self.validated.ok,
                "timings": self.validated.timings, "checks": self.validated.checks,
                "restore_seconds": restore_seconds(self.validated.timings),
                "scratch_cache": self.validated.scratch_cache,
            },
            "healed_after": self.healed_after,
            "pruned": self.pruned,
            "s3_requests": self.s3_requests,
        }
