"""The invariants every fault test asserts after the fault and a following normal run (docs/bad-days.md):

* every segment PostgreSQL was told is archived (.done in archive_status, and pg_stat_archiver's
  last archived segment) is in the archive, byte for byte (except what retention removed on
  purpose: segments before the oldest kept backup's start);
* every listed backup that is not marked failed restores: validated by a later run's restore and
  start, or checked here with `dbops verify --restore`;
* nothing is left behind in scratch.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from dbops.ops.wal.archive import WalArchive
from dbops.pg import conn
from dbops.pg.lsn import segment_of_lsn
from dbops.repo import catalog
from dbops.storage import open_store
from dbops.storage.layout import Layout


def sql(node, q: str):
    with conn.session(node) as c:
        cur = c.execute(q)
        return cur.fetchall() if cur.description else None


def archived_segments_are_in_the_archive(lab, tmp_path: Path, prefix: str | None = None) -> int:
    node = lab.primary
    pg_wal = Path(node.data_dir) / "pg_wal"
    done = sorted(n[:-5] for n in os.listdir(pg_wal / "archive_status") if n.endswith(".done"))
    last = sql(node, "SELECT last_archived_wal FROM pg_stat_archiver")[0][0]
    store = open_store(lab.config.storage)
    layout = Layout(lab.config.storage.prefix if prefix is None else prefix)
    arc = WalArchive(store, layout)
    backups = catalog.list_backups(store, layout, with_status=False)
    oldest = segment_of_lsn(backups[0].timeline, backups[0].redo_lsn)[8:] if backups else ""
    if last:
        assert arc.exists(last), f"pg_stat_archiver reports {last} archived; the archive lacks it"
    checked = 0
    for name in done:
        if not (pg_wal / name).exists() or name[8:24] < oldest:
            continue  # recycled by PostgreSQL since, or pruned by retention (before the oldest backup)
        dest = tmp_path / f"check-{name}"
        arc.fetch(name, dest)  # NotFoundError: acknowledged, never archived
        assert dest.read_bytes() == (pg_wal / name).read_bytes(), f"{name} differs from the archived copy"
        dest.unlink()
        checked += 1
    return checked


def every_listed_backup_restores(dbops_bin: str, env: dict[str, str]) -> list[str]:
    """Backups not marked failed: validated already, or `dbops verify --restore` now. Returns their ids."""
    r = subprocess.run([dbops_bin, "backup", "list", "--json"], env=env, capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    ids = []
    for b in listed:
        st = b.get("status")
        state = st.get("state") if isinstance(st, dict) else st
        if state == "failed":
            continue
        ids.append(b["backup_id"])
        if state != "validated":
            v = subprocess.run([dbops_bin, "verify", "--restore", "--json", b["backup_id"]], env=env,
                               capture_output=True, text=True, timeout=600, check=False)
            assert v.returncode == 0, f"backup {b['backup_id']} does not restore: {v.stderr[-2000:]}"
    return ids


def scratch_is_empty(scratch: Path) -> None:
    left = sorted(p.name for p in scratch.iterdir()) if scratch.exists() else []
    assert left == [], f"left behind in scratch: {left}"
