"""The typer application and the one place where exceptions become exit codes."""

from __future__ import annotations

import importlib
import logging
import pkgutil
import sys
import time
import traceback
from enum import Enum
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from dbops import __version__, log, secrets
from dbops.cli import output
from dbops.cli.state import State
from dbops.errors import DbopsError, exit_code_of

_log = log.get("cli")

try:  # the parameters' values coerced without pydantic where typer would return them as they are
    from dbops.cli import params  # typer's private coercion hook (typer 0.29, as pinned)

    params.install()
except Exception:  # noqa: BLE001  another typer (a changed private module): its own coercion, only slower
    pass


class LogFormat(str, Enum):
    text = "text"
    json = "json"


class DbopsGroup(TyperGroup):
    """Converts every exception raised by a command into its documented exit code."""

    def invoke(self, ctx):
        t0 = time.monotonic()
        command = ""
        try:
            rv = super().invoke(ctx)
        except typer.Exit as e:
            _result(command or ctx.invoked_subcommand, t0, int(getattr(e, "exit_code", 0) or 0))
            raise
        except (typer.Abort, typer.TyperException):
            raise
        except DbopsError as e:
            state = ctx.obj if isinstance(ctx.obj, State) else None
            if e.quiet:
                _log.debug("%s", e.message)
                _result(command or ctx.invoked_subcommand, t0, exit_code_of(e))
                raise typer.Exit(exit_code_of(e)) from None
            if state is not None and state.json_output:
                output.emit_json({"ok": False, **e.as_dict(), **(e.extra or {})})
            if state is not None and state.log_format == "json":
                log.event(_log, logging.ERROR, e.message, error=type(e).__name__, detail=e.detail, hint=e.hint,
                          exit_code=int(e.exit_code))
            else:
                output.err(e.render())
            _log.debug("error %s", type(e).__name__, exc_info=True)
            _result(command or ctx.invoked_subcommand, t0, exit_code_of(e))
            raise typer.Exit(exit_code_of(e)) from None
        except KeyboardInterrupt as e:
            output.err("error: interrupted; work in progress was cleaned up")
            _result(command or ctx.invoked_subcommand, t0, exit_code_of(e))
            raise typer.Exit(exit_code_of(e)) from None
        except Exception as e:  # a bug: say so, without leaking secrets
            tb = secrets.redact("".join(traceback.format_exception(type(e), e, e.__traceback__)))
            output.err(f"error: internal error: {secrets.redact(str(e)) or type(e).__name__}")
            output.err("hint: this is a bug in dbops; the traceback follows (secrets redacted)")
            output.err(tb)
            _result(command or ctx.invoked_subcommand, t0, exit_code_of(e))
            raise typer.Exit(exit_code_of(e)) from None
        _result(command or ctx.invoked_subcommand, t0, 0)
        return rv


def _result(command: str | None, t0: float, code: int) -> None:
    """One result line per run (INFO: shown with -v, and always in --log-format json at -v)."""
    log.event(_log, logging.INFO, f"dbops {command or ''} finished".replace("  ", " "), exit_code=code,
              status="ok" if code == 0 else "failed", seconds=round(time.monotonic() - t0, 3))


app = typer.Typer(
    cls=DbopsGroup,
    name="dbops",
    help="Keeps PostgreSQL recoverable: validated incremental backups, WAL archiving to S3, "
    "point-in-time restore, planned switchover.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (docs/installation.md)
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        output.out(f"dbops {__version__}")
        raise typer.Exit(0)


@app.callback()
def main(
    ctx: typer.Context,
    config: Annotated[Optional[str], typer.Option(
        "--config", "-c", envvar="DBOPS_CONFIG",
        help="Configuration file [default: ./dbops.yaml, then /etc/dbops/dbops.yaml]")] = None,
    log_format: Annotated[LogFormat, typer.Option(
        "--log-format", help="Log lines on stderr: text or json")] = LogFormat.text,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output (-vv: debug)")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit")] = False,
) -> None:
    verbosity = -1 if quiet else verbose
    log.setup(log_format.value, verbosity)
    ctx.obj = State(config_path=config, log_format=log_format.value, verbosity=verbosity)


def _register_commands() -> None:
    import dbops.cli as pkg

    for mod in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if mod.name in {"app", "entry", "output", "params", "state"} or mod.name.startswith("_"):
            continue
        m = importlib.import_module(f"dbops.cli.{mod.name}")
        reg = getattr(m, "register", None)
        if reg is not None:
            reg(app)


_register_commands()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
