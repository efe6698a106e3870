"""`dbops config check|show`."""

from __future__ import annotations

from typing import Annotated

import typer
import yaml

from dbops import config as cfgmod
from dbops.cli import output
from dbops.cli.state import state_of

config_app = typer.Typer(help="Validate and show the configuration.", no_args_is_help=True)


@config_app.command("check")
def check(ctx: typer.Context) -> None:
    """Validate the configuration file; every problem is listed at once (exit 3)."""
    st = state_of(ctx)
    cfg = st.config()
    output.out(f"configuration {cfg.path} is valid: cluster {cfg.cluster}, "
               f"{len(cfg.nodes)} node(s), bucket {cfg.storage.bucket}")


@config_app.command("show")
def show(
    ctx: typer.Context,
    json_: Annotated[bool, typer.Option("--json", help="JSON instead of YAML")] = False,
) -> None:
    """Print the effective configuration (defaults filled in, ${ENV} resolved) with secrets redacted."""
    st = state_of(ctx)
    st.json_output = json_
    data = cfgmod.redacted(st.config())
    if json_:
        output.emit_json(data)
    else:
        output.out(yaml.safe_dump(data, sort_keys=False).rstrip())


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")
