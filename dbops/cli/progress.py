"""The progress display of `backup`, `restore` and `verify` on a terminal (rich).

One line per phase: a spinner while it runs, its name, and for phases that move bytes
(download, store, verify, ...) a bar, bytes done of the total, the rate and the time left;
a finished phase keeps its line with its duration. It is drawn on stderr, so stdout stays
clean for data (`--json`), and only when stderr is a terminal, unless forced:

* ``--progress``: draw it even when stderr is not a terminal;
* ``--no-progress``: never draw it;
* neither: draw it when stderr is a terminal, print nothing extra otherwise (cron, pipes).

The workflows see two callables: ``phase(name)`` (a phase starts) and ``bytes(done, total)``
(bytes of the current phase; called from worker threads, serialised by the caller).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Optional

import typer

ProgressOpt = Annotated[Optional[bool], typer.Option(
    "--progress/--no-progress",
    help="A progress display on stderr (phase, bytes, rate, time left) [default: when stderr is a terminal]")]


def _columns():
    from rich.filesize import decimal
    from rich.progress import BarColumn, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class Bytes(ProgressColumn):
        def render(self, task):
            if not task.fields.get("bytes") or not task.total:
                return Text("")
            return Text(f"{decimal(int(task.completed))}/{decimal(int(task.total))}", style="progress.download")

    class Rate(ProgressColumn):
        def render(self, task):
            if not task.fields.get("bytes") or task.finished:
                return Text("")
            speed = task.finished_speed or task.speed
            return Text("?" if speed is None else f"{decimal(int(speed))}/s", style="progress.data.speed")

    class Left(ProgressColumn):
        max_refresh = 0.5

        def render(self, task):
            if not task.fields.get("bytes") or task.finished:
                return Text("")
            left = task.time_remaining
            if left is None:
                return Text("eta ?", style="progress.remaining")
            m, s = divmod(int(left), 60)
            h, m = divmod(m, 60)
            return Text(f"eta {h}:{m:02d}:{s:02d}" if h else f"eta {m}:{s:02d}", style="progress.remaining")

    class Bar(BarColumn):
        def render(self, task):
            if not task.fields.get("bytes"):
                return Text("")
            return super().render(task)

    return (SpinnerColumn(finished_text="[green]done"), TextColumn("{task.description:<10}"), Bar(bar_width=30),
            Bytes(), Rate(), Left(), TimeElapsedColumn())


class Display:
    """A rich Progress on stderr, one task per phase."""

    def __init__(self, *, force: bool = False) -> None:
        from rich.console import Console
        from rich.progress import Progress

        console = Console(stderr=True, force_terminal=True if force else None)
        self._progress = Progress(*_columns(), console=console, transient=False, refresh_per_second=8)
        self._task = None
        self._started = False

    def phase(self, name: str) -> None:
        if not self._started:
            self._progress.start()
            self._started = True
        if self._task is not None and self._progress.tasks[-1].description == name:
            return  # the same phase entered again (e.g. start, then waiting until ready): one line
        self._finish_current()
        self._task = self._progress.add_task(name, total=None, bytes=False)

    def bytes(self, done: int, total: int) -> None:
        if self._task is None:
            self.phase("transfer")
        self._progress.update(self._task, completed=done, total=max(total, done, 1), bytes=True)

    def _finish_current(self) -> None:
        if self._task is None:
            return
        task = self._progress.tasks[-1]
        total = task.total if task.total else 1
        self._progress.update(self._task, total=total, completed=total)
        self._progress.stop_task(self._task)

    def close(self, ok: bool = True) -> None:
        """Leave the display as it is, the last phase marked done (ok) or left where it stopped."""
        if self._started:
            if ok:
                self._finish_current()
            elif self._task is not None:
                self._progress.stop_task(self._task)
            self._task = None
            self._progress.stop()
            self._started = False


def display(enabled: bool | None) -> Display | None:
    """The display for --progress (True), --no-progress (False) or neither (None: stderr a terminal)."""
    if enabled is False or (enabled is None and not sys.stderr.isatty()):
        return None
    return Display(force=bool(enabled))


PhaseFn = Optional[Callable[[str], None]]
BytesFn = Optional[Callable[[int, int], None]]


@contextmanager
def shown(enabled: bool | None) -> Iterator[tuple[PhaseFn, BytesFn]]:
    """The (phase, bytes) callables to hand a workflow: the display's, or (None, None) when none is
    drawn. The display closes with the block, marked failed when the block raises."""
    d = display(enabled)
    try:
        yield (d.phase, d.bytes) if d else (None, None)
    except BaseException:
        if d:
            d.close(ok=False)
        raise
    if d:
        d.close()
