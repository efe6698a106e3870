"""`dbops check`: the primary's tablespaces, and whether the newest backup covers them."""

from __future__ import annotations

from typing import Any

from dbops.config import Config
from dbops.errors import DbopsError


def check(cfg: Config, report: Any) -> None:
    """Add a 'tablespaces' finding (and report.tablespaces) for the reachable primary."""
    from dbops.ops.backup import tablespaces as tbs
    from dbops.repo import catalog
    from dbops.repo import manifest as mf
    from dbops.storage import open_archive

    primary = next((n for n in report.nodes if n.reachable and n.role == "primary"), None)
    if primary is None:
        return
    node = cfg.node(primary.name)
    try:
        spaces = tbs.query(node)
    except DbopsError as e:
        report.add(f"node:{node.name}", "tablespaces", "warn", f"cannot list tablespaces: {e.message}")
        return
    covered: set[int] = set()
    newest = None
    try:
        store, layout = open_archive(cfg.storage)
        usable = [b for b in catalog.list_backups(store, layout) if b.usable]
        if usable:
            newest = usable[-1].backup_id
            covered = {t.oid for t in mf.load_header(store, layout, newest).tablespaces}
    except DbopsError:
        newest = None  # the storage findings say why
    report.tablespaces = [{**t.to_dict(), "in_newest_backup": t.oid in covered} for t in spaces]
    if not spaces:
        report.add(f"node:{node.name}", "tablespaces", "ok", "no user tablespaces (everything is in the data folder)")
        return
    listed = ", ".join(f"{t.name} (OID {t.oid}) at {t.location}" for t in spaces)
    missing = [t for t in spaces if t.oid not in covered]
    if newest is None:
        report.add(f"node:{node.name}", "tablespaces", "ok",
                   f"{len(spaces)} tablespace(s): {listed}; no backup yet (each backup will cover them)")
    elif missing:
        report.add(f"node:{node.name}", "tablespaces", "warn",
                   f"{len(spaces)} tablespace(s): {listed}; the newest backup {newest} does not cover "
                   + ", ".join(t.name for t in missing),
                   "run dbops backup: the next backup covers every tablespace of the primary")
    else:
        report.add(f"node:{node.name}", "tablespaces", "ok",
                   f"{len(spaces)} tablespace(s): {listed}; all covered by the newest backup {newest}")
