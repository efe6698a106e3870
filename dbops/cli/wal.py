"""`dbops wal-push`, `dbops wal-fetch` (archive_command / restore_command) and `dbops wal status`."""

from __future__ import annotations

import logging
import os
import time
from typing import Annotated

import typer

from dbops import log
from dbops.cli import output
from dbops.cli.state import start_line, state_of
from dbops.errors import NotFoundError, UsageError
from dbops.pg.lsn import SEGMENT_RE

_log = log.get("wal")

wal_app = typer.Typer(help="The WAL archive: status and gaps.", no_args_is_help=True)


def wal_push(
    ctx: typer.Context,
    path: Annotated[str, typer.Argument(help="The WAL file, as PostgreSQL's %p gives it (relative to the data folder)")],
    sync: Annotated[bool, typer.Option("--sync", help="Upload in this process instead of through the background pusher")] = False,
) -> None:
    """archive_command: exit 0 only once the file is stored in the archive with a verified checksum.

    Set archive_command = 'dbops -c /etc/dbops/dbops.yaml wal-push %p'. Exit 13 when the archive
    holds different content under this name or belongs to another cluster; 4 when storage fails.
    """
    from dbops.ops.wal import commands as walcmd

    cfg = state_of(ctx).config()
    how = walcmd.push(cfg, path, sync=sync)
    log.event(_log, logging.INFO, f"archived {os.path.basename(path)}", via=how)


def wal_fetch(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The WAL file name (%f)")],
    path: Annotated[str, typer.Argument(help="Where to put it (%p)")],
) -> None:
    """restore_command: fetch, verify and place one WAL file. Exit 9 (quietly) when it is not archived.

    Set restore_command = 'dbops -c /etc/dbops/dbops.yaml wal-fetch %f %p'.
    """
    from dbops.ops.wal import commands as walcmd

    cfg = state_of(ctx).config()
    try:
        how = walcmd.fetch(cfg, name, path)
    except NotFoundError as e:
        e.quiet = True  # PostgreSQL probes for files that do not exist: not an alarm (exit 9, no message)
        raise
    log.event(_log, logging.INFO, f"restored {name}", via=how)


@wal_app.command("status")
def status(
    ctx: typer.Context,
    json_: Annotated[bool, typer.Option("--json", help="Print the status as JSON")] = False,
    metrics_file: Annotated[str | None, typer.Option(
        "--metrics-file", help="Also write Prometheus textfile metrics to PATH (atomically)")] = None,
    start: Annotated[str | None, typer.Option(
        "--from", help="Check for gaps from this segment [default: the oldest backup's start]")] = None,
) -> None:
    """Newest segment per timeline, the primary's archiver, and gaps (exit 7 when a segment is missing)."""
    from dbops.ops.wal import status as walstatus
    from dbops.storage import open_archive

    cfg = state_of(ctx).config()
    start_line("wal status")
    store, layout = open_archive(cfg.storage)
    store.check()  # a clear "unreachable" / "refused" before anything else
    source = "given"
    if start is None:
        start = walstatus.oldest_backup_start(store, layout)
        source = "oldest backup"
    if start is not None and not SEGMENT_RE.match(start):
        raise UsageError(f"--from needs a WAL segment name (24 hex digits), got {start!r}")
    st = walstatus.archive_status(store, layout, start_segment=start, start_source=source)
    st.archiver = walstatus.archiver_state(cfg.nodes)
    st.spool = walstatus.spool_state(cfg, st.archiver["data_dir"] if st.archiver else None)
    if metrics_file:
        tmp = f"{metrics_file}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(walstatus.metrics_text(st, cfg.cluster))
        os.replace(tmp, metrics_file)
    from dbops.ops import recovery

    rpo = recovery.rpo(st, st.archiver)
    if json_:
        output.emit_json({**st.as_dict(), "rpo": rpo})
    else:
        output.out(_render(st, layout.root))
        output.out(rpo_line(rpo))
    walstatus.require_no_gaps(st)


@wal_app.command("find")
def find(
    ctx: typer.Context,
    dropped: Annotated[list[str], typer.Option(
        "--dropped", help="[DATABASE.][SCHEMA.]TABLE whose DROP or TRUNCATE to find (repeatable)")],
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable result on stdout")] = False,
) -> None:
    """Find when a table was dropped or truncated: the transaction, its commit time and LSN, and what else
    it dropped, read from the archived WAL. Exit 9: no backup knows the table, or no drop was found;
    7: a segment the search needs is missing."""
    from dbops.ops.wal import dropfind

    st = state_of(ctx)
    st.json_output = json_
    cfg = st.config()
    start_line("wal find", cluster=cfg.cluster, dropped=",".join(dropped))
    searches = dropfind.find(cfg, list(dropped))
    if json_:
        output.emit_json({"ok": True, "searches": [s.as_dict() for s in searches]})
    else:
        output.out("\n\n".join(render_search(s) for s in searches))
    for s in searches:
        s.chosen(None)  # exit 9 when a table has no finding (after printing what was searched)


def render_search(s) -> str:
    """One table's findings as a table, with the WAL range searched."""
    head = (f"{s.table}: {len(s.findings)} drop(s) or truncate(s) found in {s.segments} segment(s) "
            f"({output.human_bytes(s.wal_bytes)}), {s.first_segment} .. {s.last_segment}, "
            f"in {s.seconds:.1f}s; known to backup(s) {', '.join(s.backups)}")
    rows = [(f.occurrence, f.xid, f.as_dict()["commit_time"], f.as_dict()["commit_lsn"], f.timeline,
             f.as_dict()["operation"], ", ".join(f.also_dropped) or "-") for f in s.findings]
    if not rows:
        return head
    return head + "\n" + output.table(["#", "xid", "commit time", "commit LSN", "timeline", "operation",
                                        "also dropped"], rows)


def rpo_line(r: dict) -> str:
    """The RPO in one line (text of `wal status`)."""
    if r["bytes"] is None and r["seconds"] is None:
        return f"RPO: unknown ({r['note']})"
    what = "-" if r["bytes"] is None else output.human_bytes(r["bytes"])
    return (f"RPO: {what} of WAL not archived yet, {output.human_seconds(r['seconds'])} "
            + (f"(primary {r['node']} at {r['current_lsn']}, archived to {r['archived_lsn']})" if r["current_lsn"]
               else f"({r['note']})"))


def _ago(epoch: float | None) -> str:
    return "-" if not epoch else output.human_seconds(max(0.0, time.time() - epoch)) + " ago"


def _render(st, root: str) -> str:
    owner = st.system_identifier or "not claimed yet"
    lines = [f"archive {root} (system identifier {owner}, {output.human_bytes(st.wal_segment_size)} segments)"]
    rows = [(f"{t.timeline}", t.segments, t.oldest or "-", t.newest or "-", output.human_seconds(t.newest_age),
             ", ".join(t.partial) or "-", "yes" if t.has_history or t.timeline == 1 else "no")
            for t in st.timelines]
    lines.append(output.table(["TIMELINE", "SEGMENTS", "OLDEST", "NEWEST", "AGE", "PARTIAL", "HISTORY"], rows))
    a = st.archiver
    if a:
        lines.append(f"archiver on {a['node']}: archived {a['archived_count']} (last {a['last_archived_wal'] or '-'}, "
                     f"{_ago(a['last_archived_time'])}), failed {a['failed_count']} (last {a['last_failed_wal'] or '-'}, "
                     f"{_ago(a['last_failed_time'])}), {'?' if a['ready_count'] is None else a['ready_count']} waiting (.ready)")
    else:
        lines.append("archiver: no reachable primary")
    if st.spool:
        s = st.spool
        pusher = f"running (pid {s['pusher_pid']})" if s["pusher_running"] else "not running"
        lines.append(f"pusher: {pusher}; {len(s['failures'])} failing file(s)"
                     + "".join(f"\n  {n}: {f['message']}" for n, f in s["failures"].items()))
    if st.end is None:
        lines.append("no segments archived yet")
    elif st.ok:
        lines.append(f"no gaps: {st.needed} segment(s) from {st.start} ({st.start_source}) to {st.end}")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    app.command("wal-push")(wal_push)
    app.command("wal-fetch")(wal_fetch)
    app.add_typer(wal_app, name="wal")
