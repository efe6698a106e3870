"""`dbops lab up|env|status|down`: a real local lab on loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dbops.lab import harness as labmod
from dbops.cli import output
from dbops.cli.state import state_of

lab_app = typer.Typer(help="A local lab: SeaweedFS S3, a PostgreSQL 15 primary and streaming replicas on loopback.",
                      no_args_is_help=True)

DirOpt = Annotated[Path, typer.Option("--dir", help="Lab folder")]


@lab_app.command("up")
def up(
    ctx: typer.Context,
    dir: DirOpt = Path(labmod.DEFAULT_DIR),
    replicas: Annotated[int, typer.Option("--replicas", min=0, max=5, help="Streaming replicas")] = 1,
    json_: Annotated[bool, typer.Option("--json")] = False,
    encryption: Annotated[Optional[bool], typer.Option(
        "--encryption/--no-encryption",
        help="Encrypt the lab's archive with a key file DIR/encryption.key [default: on for a new lab]")] = None,
) -> None:
    """Start the lab (idempotent) and write DIR/dbops.yaml describing it."""
    state_of(ctx).json_output = json_
    info = labmod.up(dir, replicas=replicas, encrypt=encryption)
    if json_:
        output.emit_json(labmod.status(info.dir))
        return
    output.out(f"lab up in {info.dir}")
    output.out(f"  s3       {info.s3_endpoint} bucket {info.bucket}")
    for n in info.nodes:
        role = "primary" if n is info.primary else "replica"
        output.out(f"  {n.name:<8} 127.0.0.1:{n.port} ({role}) {n.data_dir}")
    output.out(f"  config   {info.config_path}")
    output.out(f"use it:   eval \"$(dbops lab env --dir {dir})\"")


@lab_app.command("env")
def env(dir: DirOpt = Path(labmod.DEFAULT_DIR)) -> None:
    """Print shell exports for the lab (DBOPS_CONFIG and libpq variables for the primary)."""
    output.out(labmod.shell_exports(labmod.info(dir)))


@lab_app.command("status")
def status(
    ctx: typer.Context,
    dir: DirOpt = Path(labmod.DEFAULT_DIR),
    json_: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """What the lab runs, and whether it is up."""
    state_of(ctx).json_output = json_
    st = labmod.status(dir)
    if json_:
        output.emit_json(st)
        return
    rows = [["s3", st["s3"]["endpoint"], "running" if st["s3"]["running"] else "stopped"]]
    for n in st["nodes"]:
        rows.append([n["name"], f"127.0.0.1:{n['port']}",
                     ("running" if n["running"] else "stopped") + f" ({n['configured_role']})"])
    output.out(output.table(["service", "address", "state"], rows))


@lab_app.command("down")
def down(
    dir: DirOpt = Path(labmod.DEFAULT_DIR),
    purge: Annotated[bool, typer.Option("--purge", help="Also remove the lab folder")] = False,
) -> None:
    """Stop only what the lab started; --purge removes its folder."""
    for line in labmod.down(dir, purge=purge):
        output.out(f"stopped {line}" if not line.startswith("removed") else line)


def register(app: typer.Typer) -> None:
    app.add_typer(lab_app, name="lab")
