"""`dbops failover --primary-lost`: rendering of the assessment, the plan and the report."""

from __future__ import annotations

import time
from typing import Any

from dbops.cli import output
from dbops.cli.failover_view import print_checks, print_phases, print_steps, print_verification, run_planned
from dbops.cli.state import State, start_line


def run_lost(st: State, *, to: str | None, dry_run: bool, yes: bool, timeout: float | None, json_: bool,
             metrics_file: str | None, no_fence: bool) -> None:
    from dbops.ops.failover import emergency
    from dbops.ops.failover.assess import LostOptions, assess
    from dbops.ops.failover.loss import metrics as loss_metrics

    started = time.monotonic()
    start_line("failover", mode="primary-lost", to=to, dry_run=dry_run, no_fence=no_fence)
    cfg = st.config()
    opts = LostOptions.from_config(cfg, to=to, timeout=timeout, no_fence=no_fence, started=started)
    plan = assess(cfg, opts)
    if not json_:
        print_plan(plan)
    run_planned(plan, json_=json_, dry_run=dry_run, yes=yes,
                question=f"{plan.old_primary.name if plan.old_primary else '?'} is lost: promote "
                         f"{plan.candidate.name if plan.candidate else '?'}?",
                no_tty="confirmation needed: pass --yes to promote without a terminal",
                execute=lambda: emergency.execute(cfg, plan, opts), print_report=print_report,
                metrics_file=metrics_file, metrics=loss_metrics, cluster=cfg.cluster)


def print_plan(plan: Any) -> None:
    old = plan.old_primary.name if plan.old_primary else "?"
    new = plan.candidate.name if plan.candidate else "?"
    output.out(f"primary lost: {old} -> {new}\n")
    rows = [[r["name"] + (" *" if r["candidate"] else ""), r["timeline"] or "", r["receive_lsn"] or "-",
             r["replay_lsn"] or "-", "" if r["behind_best_bytes"] is None else r["behind_best_bytes"]]
            for r in plan.standby_rows()]
    output.out(output.table(["STANDBY", "TIMELINE", "RECEIVED", "REPLAYED", "BEHIND BEST (BYTES)"], rows))
    a = plan.archive
    if a.checked:
        output.out(f"\narchive: newest segment on timeline {a.timeline}: {a.segment or 'none'}"
                   + (f", last record at {_lsn(a.last_record_lsn)}" if a.last_record_lsn is not None else ""))
    else:
        output.out(f"\narchive: not read ({a.error})")
    ends = plan.known_ends()
    if ends:
        best = max(ends.values())
        output.out(f"the old primary is known to have reached {_lsn(best)} ("
                   + ", ".join(k for k, v in ends.items() if v == best) + ")")
    output.out("\nchecks:")
    print_checks(plan.findings)
    print_steps(plan)


def _lsn(v: int | None) -> str:
    from dbops.pg.lsn import format_lsn

    return format_lsn(v) if v is not None else "-"


def print_report(rep: Any) -> None:
    loss = rep.loss
    head = {
        "promoted": f"{rep.new_primary} is primary on timeline {rep.timeline}"
                    + ("; COMMITS MAY BE LOST" if loss and loss.possible else "; nothing known was lost"),
        "cancelled": "nothing was promoted",
        "unknown": "outcome UNKNOWN: inspect before acting again",
    }.get(rep.outcome, rep.outcome)
    output.out("\n" + head)
    if rep.seconds_to_writable is not None:
        output.out(f"  writable {rep.seconds_to_writable:.2f} s after the command started; total "
                   f"{rep.total_seconds or 0:.1f} s")
    fence = rep.fence or {}
    if fence:
        output.out(f"  fence: {'done' if fence.get('fenced') else 'NOT DONE'} (controller: {fence.get('controller')}; "
                   f"hooks: {fence.get('hook_failure') or str(fence.get('hooks', 0)) + ' ok'})")
    if loss is not None:
        output.out("what may be lost:")
        output.out(f"  recovered up to {loss.switch_lsn} (the new timeline starts there); last recovered commit "
                   f"{loss.last_commit_lsn or '?'} at {loss.last_commit_time or '?'}")
        output.out(f"  the old primary is known to have reached {loss.known_end_lsn or '?'} "
                   f"({', '.join(loss.known_end_sources) or '-'}); "
                   f"{loss.behind_known_end_bytes if loss.behind_known_end_bytes is not None else '?'} bytes past "
                   f"the switch point, {loss.known_lost_bytes} of them known lost"
                   + (f", {loss.candidate_unreplayed_bytes} an incomplete last record" if
                      loss.candidate_unreplayed_bytes else ""))
        if loss.archive_beyond_candidate is not None:
            output.out(f"  archived WAL beyond the candidate: {'yes' if loss.archive_beyond_candidate else 'no'}"
                       + (f" ({loss.recovered_from_archive_bytes} bytes replayed from the archive)"
                          if loss.recovered_from_archive_bytes else ""))
        for r in loss.reasons:
            output.out(f"  ! {r}")
        output.out(f"  commits whose WAL reached neither a standby nor the archive cannot be counted here; "
                   f"`dbops rejoin {rep.old_primary}` lists them when its data folder is back")
    for name, how in rep.repointed.items():
        output.out(f"  repointed {name}: {how}")
    output.out("phases:")
    print_phases(rep.phases, 34)
    if rep.verification:
        output.out("verification:")
        print_verification(rep.verification)
    for n in rep.notes:
        output.out(f"  note: {n}")
    for w in rep.warnings:
        output.out(f"  ! {w}")
