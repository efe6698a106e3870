"""What `dbops failover`, `dbops failover --primary-lost` and `dbops rejoin` share: plan, check,
confirm, run, report. The checks and steps of a plan, a run's phases and verification are printed
alike; an error carries the plan and the report into the JSON error object (dbops.cli.app renders
it and turns it into the exit code)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import typer

from dbops.cli import output
from dbops.errors import DbopsError, ExitCode, UsageError


def with_context(e: DbopsError, *, plan: Any = None, report: Any = None) -> DbopsError:
    """The error, carrying the plan and the report for its JSON object (rendered by dbops.cli.app)."""
    e.extra = {"plan": plan.as_dict() if plan else None, "report": report.as_dict() if report else None}
    return e


def run_planned(plan: Any, *, json_: bool, dry_run: bool, yes: bool, question: str, no_tty: str,
                execute: Callable[[], Any], print_report: Callable[[Any], None], settled: bool = False,
                metrics_file: str | None = None, metrics: Callable[[Any], dict] | None = None,
                cluster: str = "") -> None:
    """Refuse a blocked plan (exit 11); stop after the plan on --dry-run (or when `settled`: nothing to
    do); ask unless --yes; execute; print (or emit as JSON) the report, also when the run failed.
    With `metrics_file`, the report's `metrics` go there (Prometheus textfile) in either case."""

    def record(report: Any) -> None:
        if metrics_file and metrics is not None:
            from dbops import metrics as textfile

            textfile.write(metrics_file, metrics(report), {"cluster": cluster})

    if not plan.ok:
        raise with_context(plan.refuse(), plan=plan)
    if dry_run or settled:
        if json_:
            output.emit_json({"ok": True, "dry_run": dry_run, "plan": plan.as_dict()})
        elif dry_run:
            output.out("\ndry run: nothing was changed")
        return
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(no_tty)
        if not typer.confirm(question, err=True):
            output.err("not confirmed: nothing was changed")
            raise typer.Exit(int(ExitCode.FAILED))
    try:
        report = execute()
    except DbopsError as e:
        rep = getattr(e, "report", None)
        if rep is not None:
            record(rep)
            if not json_:
                print_report(rep)
        raise with_context(e, plan=plan, report=rep)
    record(report)
    if json_:
        output.emit_json({"ok": True, "plan": plan.as_dict(), "report": report.as_dict()})
    else:
        print_report(report)


def print_checks(findings: list[Any], *, nodes: bool = True) -> None:
    for f in findings:
        output.out(f"  {f.status.upper():<4}  " + (f"[{f.node}] " if nodes and f.node else "") + f"{f.check}: {f.message}")
        if f.fix and f.status != "ok":
            output.out(f"        fix: {f.fix}")


def print_steps(plan: Any) -> None:
    if plan.ok:
        output.out("\nsteps:")
        for i, step in enumerate(plan.steps, 1):
            output.out(f"  {i:>2}. {step}")


def print_phases(phases: list[Any], width: int) -> None:
    for ph in phases:
        output.out(f"  {'ok ' if ph.ok else 'ERR'} {ph.name:<{width}} {ph.seconds:8.3f} s"
                   + (f"  {ph.detail}" if ph.detail else ""))


def print_verification(findings: list[Any]) -> None:
    for f in findings:
        output.out(f"  {f.status.upper():<4}  {f.check}: {f.message}")
