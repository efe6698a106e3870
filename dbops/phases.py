"""Timing of a workflow's named phases (backup, verify, restore)."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from dbops import log

_log = log.get("backup")


class Phases:
    """Times named phases; logs each as it ends. A phase entered twice adds up."""

    def __init__(self, progress: Callable[[str], None] | None = None) -> None:
        self.t: dict[str, float] = {}
        self.progress = progress
        self.current: str | None = None  # the phase entered last (the one an error came from)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.current = name
        if self.progress:
            self.progress(name)
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.t[name] = round(self.t.get(name, 0.0) + time.monotonic() - t0, 3)
            log.event(_log, logging.INFO, f"phase {name} done", seconds=self.t[name])
