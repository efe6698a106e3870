"""`dbops status`: the topology (roles, upstreams, timelines, lag) and every registered section."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from dbops.cli import output
from dbops.cli.state import start_line, state_of


def status(
    ctx: typer.Context,
    json_: Annotated[bool, typer.Option("--json", help="JSON instead of tables")] = False,
    metrics_file: Annotated[Optional[str], typer.Option(
        "--metrics-file", help="Also write the RPO and RTO as Prometheus textfile metrics to PATH")] = None,
) -> None:
    """One screen: which node is primary, who streams from whom, timelines and replay lag, the backups,
    the archive, the RPO (what a loss now would lose) and the RTO (the newest measured restore time)."""
    from dbops.ops import status as status_mod

    st = state_of(ctx)
    st.json_output = json_
    cfg = st.config()
    start_line("status")
    sections = status_mod.collect(cfg)
    if metrics_file:
        from dbops import metrics
        from dbops.ops import recovery

        got = {name: sec.data for name, sec in sections if sec.error is None}
        metrics.write(metrics_file, recovery.metrics(got.get("rpo"), got.get("rto")), {"cluster": cfg.cluster})
    if json_:
        output.emit_json({name: (sec.data if sec.error is None else {"error": sec.error}) for name, sec in sections})
        return
    for i, (_, sec) in enumerate(sections):
        if i:
            output.out("")
        output.out(f"{sec.title}:")
        if sec.error:
            output.out(f"  unavailable: {sec.error}")
            continue
        if sec.headers:
            output.out(output.table(sec.headers, sec.rows))
        for note in sec.notes:
            output.out(f"  ! {note}")


def register(app: typer.Typer) -> None:
    app.command("status")(status)
