"""`dbops check`: preflight of nodes, storage and the container runtime."""

from __future__ import annotations

from typing import Annotated

import typer

from dbops.cli import output
from dbops.cli.state import start_line, state_of
from dbops.errors import PreconditionError


def check(
    ctx: typer.Context,
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable report on stdout")] = False,
    skip_runtime: Annotated[bool, typer.Option("--skip-runtime", help="Do not start a throwaway container")] = False,
) -> None:
    """Check every node, the object storage and the container runtime; exit 11 if anything blocks dbops."""
    from dbops.ops.check import FAIL, OK, WARN, run_check  # here: every other command starts without it

    marks = {OK: "ok  ", WARN: "warn", FAIL: "FAIL"}
    st = state_of(ctx)
    st.json_output = json_
    cfg = st.config()
    start_line("check", cluster=cfg.cluster)
    report = run_check(cfg, runtime=not skip_runtime)
    if json_:
        output.emit_json(report.as_dict())
    else:
        for f in report.findings:
            output.out(f"[{marks[f.status]}] {f.area:<14} {f.check:<17} {f.message}")
            if f.fix and f.status != OK:
                output.out(f"{'':22}fix: {f.fix}")
        fails = sum(f.status == FAIL for f in report.findings)
        warns = sum(f.status == WARN for f in report.findings)
        output.out("")
        output.out("all checks passed" + (f" ({warns} warning(s))" if warns else "") if report.ok
                   else f"{fails} problem(s) block dbops" + (f", {warns} warning(s)" if warns else ""))
    if not report.ok:
        st.json_output = False  # the report already went to stdout
        raise PreconditionError("dbops check found problems that block backups, archiving, restore or failover",
                                hint="fix each FAIL above and run dbops check again")


def register(app: typer.Typer) -> None:
    app.command("check")(check)
