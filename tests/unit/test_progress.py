"""The progress display: drawn on a real pseudo-terminal, absent without one, forced or refused by option."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import textwrap

import pytest

from dbops.cli import progress

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


def run_on_pty(code: str) -> str:
    """Run python code with stdin/stdout/stderr on a new pseudo-terminal; what the terminal shows."""
    main, sub = pty.openpty()
    p = subprocess.Popen([sys.executable, "-c", code], stdin=sub, stdout=sub, stderr=sub, close_fds=True,
                         env={**os.environ, "COLUMNS": "120", "TERM": "xterm"})
    os.close(sub)
    out = b""
    while True:
        r, _, _ = select.select([main], [], [], 30)
        if not r:
            break
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    p.wait(timeout=30)
    os.close(main)
    return ANSI.sub("", out.decode(errors="replace"))


SCRIPT = textwrap.dedent("""
    import time
    from dbops.cli.progress import display
    d = display(None)  # stderr is a terminal here: on
    assert d is not None
    d.phase("capture")
    time.sleep(0.3)
    d.phase("download")
    for i in range(1, 11):
        d.bytes(i * 2_000_000, 20_000_000)
        time.sleep(0.05)
    d.phase("replay")
    d.phase("replay")  # entered again: still one line
    time.sleep(0.2)
    d.close()
    print("END")
""")


def test_on_a_terminal_it_shows_phases_bytes_rate_and_time():
    shown = run_on_pty(SCRIPT)
    assert "END" in shown
    assert re.search(r"capture\s+done|done\s+capture", shown), shown
    assert "download" in shown and "replay" in shown
    assert len(re.findall(r"done\s+replay", shown)) == 1, shown
    assert "20.0 MB/20.0 MB" in shown  # bytes done of the total, once finished
    assert re.search(r"\d+(\.\d+)? MB/s", shown)  # the rate while it ran
    assert re.search(r"eta \d+:\d\d", shown)  # time left while it ran
    assert re.search(r"0:00:0\d", shown)  # each phase's duration


def test_without_a_terminal_nothing_and_the_options_decide(capsys):
    assert progress.display(None) is None  # pytest's stderr is not a terminal
    assert progress.display(False) is None
    forced = progress.display(True)
    assert isinstance(forced, progress.Display)
    forced.phase("store")
    forced.bytes(5, 10)
    forced.close()
    assert "store" in capsys.readouterr().err


def test_shown_hands_out_the_callables_and_closes_the_display(capsys):
    """backup, verify and restore wire their progress through progress.shown."""
    with progress.shown(False) as (phase, nbytes):
        assert phase is None and nbytes is None
    with progress.shown(True) as (phase, nbytes):
        phase("store")
        nbytes(10, 10)
    assert "store" in capsys.readouterr().err
    with pytest.raises(RuntimeError):
        with progress.shown(True) as (phase, nbytes):
            phase("download")
            raise RuntimeError("stopped")
    assert "download" in capsys.readouterr().err
