"""`dbops backup` (+ list, show, prune) and `dbops verify`."""

from __future__ import annotations

import sys
import time
from datetime import datetime, timezone
from typing import Annotated, Optional

import typer

from dbops.cli import output
from dbops.cli.progress import ProgressOpt, shown
from dbops.cli.state import start_line, state_of
from dbops.errors import DbopsError, ValidationError

backup_app = typer.Typer(help="The validated backup chain: take, list, show, prune.", invoke_without_command=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable result on stdout")]


def _ts(t: float | None) -> str:
    if not t:
        return "-"
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


@backup_app.callback()
def backup(
    ctx: typer.Context,
    full: Annotated[bool, typer.Option("--full", help="Take a fresh full base backup instead of the next link")] = False,
    json_: JsonOpt = False,
    metrics_file: Annotated[Optional[str], typer.Option("--metrics-file", help="Write Prometheus textfile metrics")] = None,
    progress: ProgressOpt = None,
) -> None:
    """Take the next backup: restore + start + replay the previous one in a throwaway container, then store
    the new snapshot incrementally. Silent on success unless -v (cron-friendly)."""
    if ctx.invoked_subcommand is not None:
        return
    from dbops.ops.backup import run as bk

    st = state_of(ctx)
    st.json_output = json_
    cfg = st.config()
    start_line("backup", cluster=cfg.cluster, full=full)
    t0 = time.time()
    try:
        with shown(progress) as (phase, nbytes):
            res = bk.run_backup(cfg, full=full, progress=phase, byte_progress=nbytes)
    except BaseException as e:
        if metrics_file and isinstance(e, DbopsError):
            _write_backup_metrics(metrics_file, cfg.cluster, ok=False, duration=time.time() - t0,
                                  validation_ok=0 if isinstance(e, ValidationError) else None)
        raise
    if metrics_file:
        v = res.validated
        _write_backup_metrics(metrics_file, cfg.cluster, ok=True, duration=time.time() - t0,
                              stored=res.manifest.stored_bytes, logical=res.manifest.logical_size,
                              validation_ok=1 if v is not None else None,
                              restore_seconds=bk.restore_seconds(v.timings) if v else None,
                              pruned=res.pruned, s3_requests=res.s3_requests)
    d = res.as_dict()
    if json_:
        output.emit_json(d)
        return
    if st.verbosity >= 1 or sys.stdout.isatty():
        if res.validated:
            output.out(f"validated {res.validated.backup_id}: restored, started and replayed to "
                       f"{d['consistent_lsn']} in {output.human_seconds(d['validated']['restore_seconds'])} "
                       f"({', '.join(dict.fromkeys(c['check'] for c in res.validated.checks))})")
        output.out(f"stored {res.kind} backup {res.backup_id}: {output.human_bytes(res.manifest.logical_size)} "
                   f"logical, {output.human_bytes(res.manifest.stored_bytes)} new in storage, "
                   f"consistent at {d['consistent_lsn']} ({_ts(d['consistent_time'])})"
                   + (f"; {res.s3_requests['total']} S3 requests" if res.s3_requests else ""))
        if res.pruned is not None:
            output.out(pruned_line(res.pruned))


def pruned_line(p: dict) -> str:
    """One line on what retention removed (backup.retention.auto)."""
    if not p["remove"] and not p["packs"] and not p["wal_segments"]:
        return f"retention: nothing to remove ({len(p['keep'])} backup(s) kept)"
    return (f"retention: removed {len(p['remove'])} backup(s)" + (f" ({', '.join(p['remove'])})" if p["remove"] else "")
            + f", {p['packs']} pack(s) ({output.human_bytes(p['freed_bytes'])}) and {p['wal_segments']} WAL file(s) "
              f"older than {p['oldest_wal'] or '-'}; {len(p['keep'])} backup(s) kept")


def _write_backup_metrics(path: str, cluster: str, *, ok: bool, duration: float, stored: int | None = None,
                          logical: int | None = None, validation_ok: int | None = None,
                          restore_seconds: float | None = None, pruned: dict | None = None,
                          s3_requests: dict | None = None) -> None:
    from dbops import metrics

    prev = metrics.read_values(path)
    now = time.time()
    metrics.write(path, {
        "dbops_backup_last_run_timestamp_seconds": (now, "When the last backup run ended"),
        "dbops_backup_last_run_success": (1 if ok else 0, "1 if the last backup run succeeded"),
        "dbops_backup_last_success_timestamp_seconds": (
            now if ok else prev.get("dbops_backup_last_success_timestamp_seconds"), "When a backup last succeeded"),
        "dbops_backup_duration_seconds": (round(duration, 3), "Duration of the last backup run"),
        "dbops_backup_stored_bytes": (stored if ok else prev.get("dbops_backup_stored_bytes"),
                                      "Bytes the last backup added to storage"),
        "dbops_backup_logical_bytes": (logical if ok else prev.get("dbops_backup_logical_bytes"),
                                       "Logical size of the last backup"),
        "dbops_backup_validation_ok": (validation_ok, "1 if the last validation of the previous backup passed"),
        "dbops_backup_restore_seconds": (restore_seconds if ok else prev.get("dbops_backup_restore_seconds"),
                                         "Measured restore time of the last validated backup"),
        "dbops_backup_s3_requests": ((s3_requests or {}).get("total"),
                                     "S3 requests the last successful backup run sent (S3 bills per request)"),
        "dbops_backup_s3_write_class_requests": ((s3_requests or {}).get("write_class"),
                                                 "Of those, PUT/LIST-class requests (the dearer class)"),
        "dbops_backup_s3_read_class_requests": ((s3_requests or {}).get("read_class"),
                                                "Of those, GET/HEAD-class requests"),
        "dbops_backup_pruned_backups": (len(pruned["remove"]) if pruned else None,
                                        "Backups the last run's automatic retention removed"),
        "dbops_backup_pruned_bytes": (pruned["freed_bytes"] if pruned else None,
                                      "Pack bytes the last run's automatic retention freed"),
        "dbops_backup_retained_backups": (len(pruned["keep"]) if pruned else None,
                                          "Backups kept after the last run's automatic retention"),
    }, {"cluster": cluster})


@backup_app.command("list")
def list_(ctx: typer.Context, json_: JsonOpt = False) -> None:
    """Every backup, oldest first (ordered by consistent time, never by name)."""
    from dbops.ops import catalogview

    st = state_of(ctx)
    st.json_output = json_
    rows = catalogview.list_rows(st.config())
    if json_:
        output.emit_json(rows)
        return
    if not rows:
        output.out("no backups yet: run `dbops backup`")
        return
    output.out(output.table(
        ["id", "consistent", "lsn", "tl", "logical", "stored", "new", "status", "restore"],
        [[r["backup_id"], _ts(r["consistent_time"]), r["consistent_lsn"], r["timeline"],
          output.human_bytes(r["logical_size"]), output.human_bytes(r["stored_size"]),
          output.human_bytes(r["new_bytes"]), r["status"], output.human_seconds(r["restore_seconds"])]
         for r in rows]))
    cut = [(r["backup_id"], catalogview.pitr_note(r)) for r in rows if r.get("pitr_until")]
    for backup_id, note in cut:
        output.out(f"{backup_id}: {note} (restore --to a later point before the next backup exits 7)")


@backup_app.command("show")
def show(ctx: typer.Context, backup_id: Annotated[str, typer.Argument(help="Backup id (or 'latest')")],
         json_: JsonOpt = False,
         relations: Annotated[bool, typer.Option(
             "--relations", help="Also list the tables its relation map knows (what --before-drop can find)")] = False,
         ) -> None:
    """One backup in detail: manifest summary, status history, validation timings."""
    from dbops.ops import catalogview

    st = state_of(ctx)
    st.json_output = json_
    d = catalogview.show(st.config(), backup_id)
    if relations:
        from dbops.ops.wal import dropfind

        d["relations"] = dropfind.tables_of(st.config(), d["backup_id"])
    if json_:
        output.emit_json(d)
        return
    for k in ("backup_id", "kind", "parent_id", "status", "consistent_lsn", "timeline", "redo_lsn",
              "pg_version", "system_identifier", "dbops_version"):
        output.out(f"{k:<18} {d.get(k)}")
    output.out(f"{'consistent_time':<18} {_ts(d['consistent_time'])}")
    output.out(f"{'logical_size':<18} {output.human_bytes(d['logical_size'])} in {d['files']} files")
    output.out(f"{'new_bytes':<18} {output.human_bytes(d['new_bytes'])}")
    output.out(f"{'timings':<18} " + ", ".join(f"{k} {v:.1f}s" for k, v in d["timings"].items()))
    for t in d.get("tablespaces", []):
        output.out(f"{'tablespace':<18} {t['name']} (OID {t['oid']}): {output.human_bytes(t['size'])}, "
                   f"from {t['location']}")
    output.out("history:")
    for h in d["history"]:
        line = f"  {_ts(h['at'])} {h['state']:<9} run {h['run_id']}"
        if h.get("reason"):
            line += f": {h['reason']}"
        if h.get("timings"):
            line += " (" + ", ".join(f"{k} {v:.1f}s" for k, v in h["timings"].items()) + ")"
        output.out(line)
    if relations:
        rel = d["relations"]
        output.out("relations:" if rel is not None else "relations: none recorded (taken before relation maps)")
        for t in rel or []:
            output.out(f"  {t['table']} (oid {t['oid']}, file {t['file']}, {t['parts']} index/TOAST file(s))")


@backup_app.command("prune")
def prune(
    ctx: typer.Context,
    confirm: Annotated[bool, typer.Option("--confirm", help="Delete; without it, only print what would go")] = False,
    json_: JsonOpt = False,
) -> None:
    """Apply the retention policy (backup.retention): a preview unless --confirm."""
    from dbops.ops import catalogview

    st = state_of(ctx)
    st.json_output = json_
    cfg = st.config()
    start_line("backup prune", cluster=cfg.cluster, confirm=confirm)
    d = catalogview.prune(cfg, confirm=confirm)
    if json_:
        output.emit_json(d)
        return
    verb = "removed" if confirm else "would remove"
    for b in d["remove"]:
        output.out(f"{verb} backup {b} ({d['reasons'].get(b, '')})")
    for b in d["keep"]:
        output.out(f"keep backup {b} ({d['reasons'].get(b, '')})")
    output.out(f"{verb} {d['packs']} pack(s) ({output.human_bytes(d['freed_bytes'])}) and "
               f"{d['wal_segments']} WAL file(s) older than {d['oldest_wal'] or '-'}")
    if not confirm:
        output.out("preview only: run with --confirm to delete")


def verify(
    ctx: typer.Context,
    backup_id: Annotated[Optional[str], typer.Argument(help="Backup id (default: the newest)")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every backup")] = False,
    restore: Annotated[bool, typer.Option("--restore", help="Also restore and start it in a throwaway container")] = False,
    json_: JsonOpt = False,
    progress: ProgressOpt = None,
) -> None:
    """Re-read and hash every stored object a backup needs; with --restore, also start it. Exit 7 if broken."""
    from dbops.ops import catalogview

    st = state_of(ctx)
    st.json_output = json_
    cfg = st.config()
    start_line("verify", cluster=cfg.cluster)
    with shown(progress) as (phase, nbytes):
        reports = catalogview.verify(cfg, backup_id=backup_id, all_=all_, restore=restore, progress=phase,
                                     byte_progress=nbytes)
    bad = [r for r in reports if not r["ok"]]
    if json_:
        output.emit_json({"ok": not bad, "backups": reports})
    else:
        for r in reports:
            status = "ok" if r["ok"] else "BROKEN"
            output.out(f"{r['backup_id']}: {status}: {r['objects']} objects, {r['chunks']} chunks, "
                       f"{output.human_bytes(r['fetched_bytes'])} read in {output.human_seconds(r['seconds'])}"
                       + (f"; started and replayed in {output.human_seconds(r['restore_seconds'])}"
                          if r.get("restore_seconds") is not None else ""))
            for p in r["problems"]:
                output.out(f"  {p['key']}: {p['reason']}" + (f" (files: {', '.join(p['files'][:5])})"
                                                            if p.get("files") else ""))
    if bad:
        st.json_output = False
        raise ValidationError(f"{len(bad)} backup(s) failed verification: " + ", ".join(r["backup_id"] for r in bad),
                              hint="the next `dbops backup` heals the chain with a fresh full backup")


def register(app: typer.Typer) -> None:
    app.add_typer(backup_app, name="backup")
    app.command("verify")(verify)


