"""`dbops rejoin NODE`: a former primary becomes a standby of the current primary."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from dbops.cli import output
from dbops.cli.failover_view import print_checks, print_phases, print_verification, run_planned
from dbops.cli.state import start_line, state_of


def rejoin(
    ctx: typer.Context,
    node: Annotated[str, typer.Argument(help="The node to bring back (a former primary)")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check and print the plan; change nothing")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Seconds to wait for each step "
                                                  "[default: failover.timeout]")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the plan and the report as JSON")] = False,
) -> None:
    """Rewind NODE (pg_rewind, only if its WAL diverged) and make it a standby of the current primary.

    Transactions NODE has past the point where the new timeline left it are listed first
    (LSN, transaction id, commit time): they existed only on NODE and pg_rewind discards them.

    Exit codes: 0 it streams from the primary; 11 refused (nothing changed); 8 started but not
    confirmed streaming; 5 PostgreSQL or pg_rewind failed.
    """
    from dbops.ops.failover import rejoin as rj

    st = state_of(ctx)
    st.json_output = json_
    start_line("rejoin", node=node, dry_run=dry_run)
    cfg = st.config()
    p = rj.plan(cfg, node)
    if not json_:
        output.out(f"rejoin {node} as a standby of {p.primary.name if p.primary else '?'}")
        print_checks(p.findings, nodes=False)
    run_planned(p, json_=json_, dry_run=dry_run, yes=yes, settled=p.already,
                question=f"Rewind {node} if needed and make it a standby of {p.primary.name if p.primary else '?'}?",
                no_tty="confirmation needed: pass --yes to rejoin without a terminal",
                execute=lambda: rj.execute(cfg, p, timeout=timeout if timeout is not None else cfg.failover.timeout),
                print_report=_print)


def _print(rep: Any) -> None:
    output.out(f"\n{rep.node}: {rep.outcome.replace('_', ' ')} (standby of {rep.primary}, timeline {rep.timeline})")
    d = rep.divergence
    if d is not None:
        if d.bytes or d.commits:
            output.out(f"  only on {rep.node}: WAL {d.switch_lsn} .. {d.end_lsn} ({d.bytes} bytes) on timeline "
                       f"{d.timeline}: {d.commits} commit(s), {d.aborts} abort(s)"
                       + (f", committed {d.first_commit_time} .. {d.last_commit_time}" if d.commits else ""))
            for t in d.transactions[:20]:
                output.out(f"    {t['kind']:<8} xid {t['xid']:<10} at {t['lsn']:<12} {t['time']}")
            if len(d.transactions) > 20 or d.commits + d.aborts > len(d.transactions):
                output.out(f"    ... {d.commits + d.aborts - 20} more (--json lists up to {len(d.transactions)})")
        else:
            output.out(f"  nothing only on {rep.node}: its WAL ends at {d.end_lsn}, the switch point is {d.switch_lsn}")
        if d.note:
            output.out(f"  note: {d.note}")
    output.out(f"  pg_rewind: {'ran' if rep.rewound else 'not needed'} ({rep.rewind_reason})"
               + (f"; servers diverged at {rep.rewind_diverged_at}" if rep.rewind_diverged_at else ""))
    print_phases(rep.phases, 20)
    print_verification(rep.verification)


def register(app: typer.Typer) -> None:
    app.command("rejoin")(rejoin)
