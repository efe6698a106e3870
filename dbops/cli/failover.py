"""`dbops failover`: planned switchover of the primary role to a standby."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from dbops.cli import output
from dbops.cli.failover_view import print_checks, print_phases, print_steps, print_verification, run_planned
from dbops.cli.state import start_line, state_of
from dbops.errors import UsageError


def failover(
    ctx: typer.Context,
    to: Annotated[str | None, typer.Option("--to", help="Node to promote [default: the most advanced "
                                                          "healthy standby of the primary]")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check and print the plan; change nothing")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
    max_lag: Annotated[str | None, typer.Option("--max-lag", help="Most WAL the candidate may still have to "
                                                   "replay, bytes or 16MiB [default: failover.max_lag]")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Seconds to wait for each step (catch-up, "
                                                     "promotion, rejoin) [default: failover.timeout]")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the plan and the report as JSON")] = False,
    metrics_file: Annotated[str | None, typer.Option("--metrics-file", help="Write Prometheus textfile "
                                                        "metrics of this run here")] = None,
    primary_lost: Annotated[bool, typer.Option("--primary-lost", help="The primary is gone: fence it, recover "
                                               "what the archive holds, promote the most advanced standby, "
                                               "report what may be lost (refused while the primary answers)")] = False,
    no_fence: Annotated[bool, typer.Option("--no-fence", help="With --primary-lost: promote even when the old "
                                           "primary could not be fenced (there may then be two primaries)")] = False,
) -> None:
    """Move the primary role to a standby: zero lost commits, a write gap counted in milliseconds.

    Exit codes: 0 done and verified; 11 refused by preflight (nothing changed); 12 failed and
    rolled back (the old primary is primary again); 8 outcome could not be confirmed.
    With --primary-lost: 0 promoted, nothing known lost; 15 promoted, commits may be lost;
    11 refused (the primary answers, or it could not be fenced): nothing promoted.
    """
    from dbops import config as cfgmod
    from dbops.ops.failover import report as fo_report
    from dbops.ops.failover import switchover as fo
    from dbops.ops.failover.plan import Options, make_plan

    st = state_of(ctx)
    st.json_output = json_
    if no_fence and not primary_lost:
        raise UsageError("--no-fence goes with --primary-lost (a planned switchover always stops the old primary)")
    if primary_lost:
        if max_lag is not None:
            raise UsageError("--max-lag is for the planned switchover; --primary-lost promotes the most advanced "
                             "standby whatever its lag, after replaying the archive")
        from dbops.cli.failover_lost import run_lost

        run_lost(st, to=to, dry_run=dry_run, yes=yes, timeout=timeout, json_=json_, metrics_file=metrics_file,
                 no_fence=no_fence)
        return
    start_line("failover", to=to, dry_run=dry_run)
    cfg = st.config()
    lag = None
    if max_lag is not None:
        lag = cfgmod.parse_size(max_lag)
        if lag is None:
            raise UsageError(f"--max-lag: expected bytes or a size like 16MiB, got {max_lag!r}")
    opts = Options.from_config(cfg, to=to, max_lag=lag, timeout=timeout)
    plan = make_plan(cfg, opts)
    if not json_:
        _print_plan(plan)
    run_planned(plan, json_=json_, dry_run=dry_run, yes=yes,
                question=f"Switch the primary from {plan.old_primary.name if plan.old_primary else '?'} to "
                         f"{plan.candidate.name if plan.candidate else '?'}?",
                no_tty="confirmation needed: pass --yes to switch over without a terminal",
                execute=lambda: fo.execute(cfg, plan, opts), print_report=_print_report,
                metrics_file=metrics_file, metrics=fo_report.metrics, cluster=cfg.cluster)


def _print_plan(plan: Any) -> None:
    old = plan.old_primary.name if plan.old_primary else "?"
    new = plan.candidate.name if plan.candidate else "?"
    output.out(f"switchover plan: {old} -> {new}\n")
    rows = []
    for s in plan.topology.nodes:
        lag = plan.topology.replay_lag(s) if s.role == "standby" else None
        rows.append([s.name, s.role, s.upstream or "", s.timeline or "", "" if lag is None else lag,
                     (s.error or "")[:60]])
    output.out(output.table(["NODE", "ROLE", "UPSTREAM", "TIMELINE", "REPLAY LAG", "NOTE"], rows))
    output.out("\npreflight:")
    print_checks(plan.findings)
    print_steps(plan)


def _print_report(rep: Any) -> None:
    head = {
        "succeeded": f"switchover succeeded: {rep.new_primary} is primary on timeline {rep.timeline}",
        "rolled_back": f"switchover failed and was rolled back: {rep.old_primary} is primary again",
        "unknown": "switchover outcome UNKNOWN: inspect before acting again",
        "cancelled": "switchover cancelled: nothing was changed",
    }.get(rep.outcome, f"switchover {rep.outcome}")
    output.out("\n" + head)
    if rep.switch_lsn:
        output.out(f"  switch LSN {rep.switch_lsn} (shutdown checkpoint {rep.shutdown_checkpoint_lsn})")
    if rep.write_unavailable_seconds is not None:
        output.out(f"  writes unavailable for {rep.write_unavailable_seconds:.3f} s; "
                   f"total {rep.total_seconds or 0:.1f} s")
    if rep.rewind:
        output.out(f"  pg_rewind {'run' if rep.rewind['needed'] else 'not needed'}: {rep.rewind['reason']}")
    output.out("phases:")
    print_phases(rep.phases, 32)
    if rep.verification:
        output.out("verification:")
        print_verification(rep.verification)
    for w in rep.warnings:
        output.out(f"  ! {w}")


def register(app: typer.Typer) -> None:
    app.command("failover")(failover)
