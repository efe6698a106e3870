"""Global options, shared by every command through typer's context."""

from __future__ import annotations

from dataclasses import dataclass, field

from dbops.config import Config


@dataclass
class State:
    config_path: str | None = None
    log_format: str = "text"
    verbosity: int = 0
    json_output: bool = False
    _config: Config | None = field(default=None, repr=False)

    def config(self) -> Config:
        if self._config is None:
            from dbops import config as cfgmod

            self._config = cfgmod.load(self.config_path)
        return self._config


def state_of(ctx) -> State:
    """The State for this invocation (created when a sub-app is invoked on its own, as in tests)."""
    obj = ctx.find_object(State)
    if obj is None:
        obj = State()
        ctx.obj = obj
    return obj


def start_line(command: str, **fields) -> None:
    """Every run logs one start line naming the command."""
    import logging

    from dbops import __version__, log

    log.event(log.get("cli"), logging.INFO, f"dbops {command} starting", version=__version__, **fields)
