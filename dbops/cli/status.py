"""`dbops status`: the topology (roles, upstreams, timelines, lag) and every registered section."""

from __future__ import annotations

from typing import Annotated

import typer

from dbops.cli import output
from dbops.cli.state import start_line, state_of


def status(
    ctx: typer.Context,
    json_: Annotated[bool, typer.Option("--json", help="JSON instead of tables")] = False,
) -> None:
    """One screen: which node is primary, who streams from whom, timelines and replay lag."""
    from dbops.ops import status as status_mod

    st = state_of(ctx)
    st.json_output = json_
    start_line("status")
    sections = status_mod.collect(st.config())
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
