"""Timed phases of a failover run (switchover, --primary-lost, rejoin): each one logged and recorded in
its report, with its outcome and detail."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from dbops import log
from dbops.errors import DbopsError

_log = log.get("failover")

Observer = Callable[[str, str], None]  # (phase, "start" | "end")


@dataclass
class Phase:
    name: str
    seconds: float
    ok: bool = True
    detail: str | None = None


class Phases:
    """Records phases into `phases`; a guarded step's failure goes to `warnings` and the run goes on."""

    def __init__(self, phases: list[Phase], warnings: list[str], observer: Observer | None = None):
        self.phases, self.warnings, self.observer = phases, warnings, observer

    @contextmanager
    def phase(self, name: str) -> Iterator[Phase]:
        ph = Phase(name, 0.0)
        if self.observer:
            self.observer(name, "start")
        t0 = time.monotonic()
        try:
            yield ph
        except BaseException as e:
            ph.ok = False
            ph.detail = ph.detail or (e.message if isinstance(e, DbopsError) else type(e).__name__)
            raise
        finally:
            ph.seconds = round(time.monotonic() - t0, 4)
            self.phases.append(ph)
            log.event(_log, logging.INFO, f"phase {name}", seconds=ph.seconds, ok=ph.ok, detail=ph.detail)
            if self.observer:
                self.observer(name, "end")

    def guarded(self, name: str, fn: Callable[[], str | None]) -> None:
        """A step after promotion (returns its detail): a failure is recorded, never stops the others."""
        try:
            with self.phase(name) as ph:
                ph.detail = fn()
        except DbopsError as e:
            self.warnings.append(f"{name}: {e.message}" + (f" ({e.detail.strip()})" if e.detail else ""))


__all__ = ["Observer", "Phase", "Phases"]
