"""`dbops restore`: point-in-time restore into a folder (``--dry-run`` prints the plan only)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from dbops.cli import output
from dbops.cli.progress import ProgressOpt, shown
from dbops.cli.state import start_line, state_of


def restore(
    ctx: typer.Context,
    target_dir: Annotated[str, typer.Option("--target-dir", help="Folder to restore into (new or empty)")],
    to: Annotated[Optional[str], typer.Option(
        "--to", help="ISO 8601 time WITH zone (2026-11-25T15:46:00+01:00, ...Z), or 'latest'")] = None,
    to_lsn: Annotated[Optional[str], typer.Option("--to-lsn", help="Stop at this WAL location (16/B374D848)")] = None,
    to_xid: Annotated[Optional[str], typer.Option("--to-xid", help="Stop at the commit of this transaction")] = None,
    to_name: Annotated[Optional[str], typer.Option("--to-name", help="Stop at this restore point")] = None,
    before_drop: Annotated[Optional[list[str]], typer.Option(
        "--before-drop", help="Stop just before the transaction that dropped or truncated this table "
                              "([DATABASE.][SCHEMA.]TABLE; repeatable), found in the archived WAL")] = None,
    occurrence: Annotated[Optional[int], typer.Option(
        "--occurrence", help="With --before-drop: the N-th drop of the table (1 = the oldest; default: the "
                             "latest)")] = None,
    exclusive: Annotated[bool, typer.Option("--exclusive", help="Stop just before the target, not after it")] = False,
    timeline: Annotated[str, typer.Option("--timeline", help=(
        "'auto' (the newest timeline whose history holds the target), 'latest' (the highest) or a number"))] = "auto",
    backup_id: Annotated[Optional[str], typer.Option("--backup", help="Restore this backup (checked against the "
                                                                      "target) instead of picking one; no "
                                                                      "fallback")] = None,
    promote: Annotated[bool, typer.Option("--promote", help="At the target, end recovery (default)")] = False,
    pause: Annotated[bool, typer.Option("--pause", help="At the target, stay paused in recovery, to inspect")] = False,
    shutdown: Annotated[bool, typer.Option("--shutdown", help="At the target, stay stopped in recovery")] = False,
    start: Annotated[bool, typer.Option("--start", help="Leave the restored server running (needs --port)")] = False,
    port: Annotated[Optional[int], typer.Option("--port", help="Port of the restored server")] = None,
    keep_archiving: Annotated[bool, typer.Option(
        "--keep-archiving", help="Keep the backup's archive_mode (default: off, so the copy never archives)")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace the contents of a non-empty target folder")] = False,
    delta: Annotated[bool, typer.Option("--delta", help="Reuse the data folder there; fetch what differs")] = False,
    no_space_check: Annotated[bool, typer.Option(
        "--no-space-check", help="Skip the free-space check before the download (for filesystems that compress: "
                                 "ZFS, btrfs)")] = False,
    tablespace_map: Annotated[Optional[list[str]], typer.Option(
        "--tablespace-map", metavar="NAME=DIR",
        help="Restore tablespace NAME (or OID) into DIR (repeatable)")] = None,
    tablespace_map_all: Annotated[Optional[str], typer.Option(
        "--tablespace-map-all", metavar="DIR", help="Restore every tablespace not mapped one by one into DIR/<name>")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and change nothing")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable result on stdout")] = False,
    progress: ProgressOpt = None,
) -> None:
    """Restore to a point in time: pick the backup (the newest that fits; an older validated one is the
    fallback if it turns out damaged), download it verified, replay the archive to the target, report
    what was reached. Exit 10: target before the oldest backup or past the archive; 7: a missing segment
    or a damaged stored object (of the backup and of its fallback); 11: target folder not empty (without
    --force), a tablespace's folder not empty or used by a running server (map it elsewhere with
    --tablespace-map), or not enough free space for the backup's files (checked before the download)."""
    from dbops.errors import UsageError
    from dbops.ops.restore import plan as rs
    from dbops.ops.restore import run as restore_run
    from dbops.ops.restore.tablespaces import parse_map
    from dbops.ops.restore.target import from_options, parse_timeline

    st = state_of(ctx)
    st.json_output = json_
    finals = [n for n, on in (("promote", promote), ("pause", pause), ("shutdown", shutdown)) if on]
    if len(finals) > 1:
        raise UsageError("choose one of --promote, --pause, --shutdown")
    found = None
    if before_drop:
        if any(v is not None for v in (to, to_lsn, to_xid, to_name)) or exclusive:
            raise UsageError("--before-drop is a target of its own: leave out --to, --to-lsn, --to-xid, --to-name "
                             "and --exclusive")
        from dbops.ops.restore import beforedrop

        found = beforedrop.resolve(st.config(), list(before_drop), occurrence)
        target = found.target
        if not json_:
            output.err(render_found(found))
    else:
        if occurrence is not None:
            raise UsageError("--occurrence goes with --before-drop")
        target = from_options(to=to, to_lsn=to_lsn, to_xid=to_xid, to_name=to_name, exclusive=exclusive)
    opts = rs.Options(target=target, target_dir=Path(target_dir).absolute(), timeline=parse_timeline(timeline),
                      backup_id=backup_id, final=finals[0] if finals else "promote", start=start, port=port,
                      keep_archiving=keep_archiving, force=force, delta=delta, space_check=not no_space_check,
                      tablespace_map=parse_map(tablespace_map or ()),
                      tablespace_map_all=Path(tablespace_map_all).absolute() if tablespace_map_all else None)
    cfg = st.config()
    start_line("restore", cluster=cfg.cluster, target=target.describe(), dry_run=dry_run)
    if dry_run:
        plan = rs.plan_restore(cfg, opts)
        if json_:
            output.emit_json({"ok": True, "dry_run": True, **plan.as_dict(),
                              **({"before_drop": found.as_dict()} if found else {})})
        else:
            output.out(render_plan(plan.as_dict()))
            output.out("dry run: nothing was changed")
        return
    with shown(progress) as (phase, nbytes):
        res = restore_run.restore(cfg, opts, progress=phase, byte_progress=nbytes)
    d = res.as_dict()
    if found:
        d["before_drop"] = found.as_dict()
    if json_:
        output.emit_json(d)
    else:
        output.out(render_result(d))


def render_found(found) -> str:
    f = found.finding.as_dict()
    lines = [f"found     {f['operation']} of {f['table']}: transaction {f['xid']}, committed {f['commit_time']} "
             f"at LSN {f['commit_lsn']} on timeline {f['timeline']} (drop {f['occurrence']} of "
             f"{len(next(s for s in found.searches if s.table == f['table']).findings)})"]
    if f["also_dropped"]:
        lines.append(f"          the same transaction also dropped: {', '.join(f['also_dropped'])}")
    for c in found.chosen:
        if c is not found.finding:
            lines.append(f"          ({c.table}: transaction {c.xid} comes later; stopping before the earlier one)")
    lines.append(f"restoring to just before transaction {f['xid']}")
    return "\n".join(lines)


def render_plan(p: dict[str, Any]) -> str:
    b, w, t = p["backup"], p["wal"], p["target"]
    est = p["estimate"]
    lines = [
        f"backup    {b['backup_id']} ({b['state']}): consistent at {b['consistent_lsn']} ({b['consistent_time']}), "
        f"last commit {b['last_commit_time'] or '-'}, timeline {b['timeline']}, "
        f"{output.human_bytes(b['logical_size'])}",
        *([f"fallback  {p['fallback']['backup_id']} ({p['fallback']['state']}): consistent at "
           f"{p['fallback']['consistent_lsn']} ({p['fallback']['consistent_time']}), restored instead if "
           f"{b['backup_id']} turns out damaged in storage"] if p.get("fallback") else []),
        f"target    {_target(t)} on timeline {p['timeline']}, then {p['final']}"
        + (f" and start on port {p['port']}" if p["start"] else ""),
        f"into      {p['target_dir']}",
        f"wal       {w['segments']} segment(s), {output.human_bytes(w['bytes'])} to replay, {w['first']} .. "
        f"{w['last']}; {w['fetch_ahead']} fetched ahead ({output.human_bytes(w['fetch_ahead_stored_bytes'])} stored)",
        f"earliest  {p['earliest']['time']} (LSN {p['earliest']['lsn']}, backup {p['earliest']['backup_id']})",
        f"newest    {p['newest']['time'] or '-'} (last archived commit, LSN {p['newest']['commit_lsn'] or '-'}); "
        f"the archive ends at {p['archive_end']['segment']} (LSN {p['archive_end']['lsn']})",
        "estimate  " + (f"{output.human_seconds(est['seconds'])} ({est['basis']})" if est["seconds"] is not None
                        else est["basis"]),
        *(f"tblspc    {t['name']} (OID {t['oid']}, {output.human_bytes(t['size'])}) -> {t['folder']} "
          f"({_how(t)})" for t in p.get("tablespaces", [])),
        "settings  (postgresql.auto.conf of the restored folder)",
        *(f"  {k} = '{v}'" for k, v in p["settings"].items()),
        *(f"note: {n}" for n in p["notes"]),
    ]
    return "\n".join(lines)


def _how(t: dict[str, Any]) -> str:
    how = {"mapped": "--tablespace-map", "map-all": "--tablespace-map-all", "reused": "the folder it links to now",
           "original": "its original location"}[t["how"]]
    return f"{how}, {t['state']}"


def _target(t: dict[str, Any]) -> str:
    if t["kind"] == "latest":
        return f"the end of the archive (LSN {t['lsn']})"
    how = "" if t["inclusive"] else ", exclusive"
    return {"time": f"time {t['time']}", "lsn": f"LSN {t['lsn']}", "xid": f"transaction {t['value']}",
            "name": f"restore point {t['value']!r}"}[t["kind"]] + how


def render_result(d: dict[str, Any]) -> str:
    r = d["reached"]
    fb = d.get("fell_back_from")
    lines = [f"restored backup {d['backup_id']} into {d['target_dir']}",
             *([f"fell back from backup {fb['backup_id']}, damaged in storage: {fb['reason']}"] if fb else []),
             f"reached   LSN {r['lsn']}, last commit {r['last_commit_time'] or '-'}, timeline {r['timeline']}",
             f"state     {d['final_state']}" + (f" (new timeline {r['promoted_timeline']})"
                                                 if r.get("promoted_timeline") else ""),
             "timings   " + ", ".join(f"{k} {v:.2f}s" for k, v in d["timings"].items())
             + f" (total {d['seconds']:.2f}s)"]
    if r.get("locked") and d["final_state"] != "promoted":
        lines.append("locked    " + ", ".join(r["locked"]) + ": a transaction that commits after the target "
                     "holds them; reading them waits until promotion")
    if d["running"]:
        lines.append(f"running   on port {d['running']['port']} (pid {d['running']['pid']}, log {d['running']['log']})")
    else:
        lines.append(f"stopped   cleanly; start it with: pg_ctl -D {d['target_dir']} start (as its owner)")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    app.command("restore")(restore)
