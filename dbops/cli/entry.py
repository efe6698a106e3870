"""Process entry point: `dbops ...`.

Kept tiny so `dbops wal-push` / `wal-fetch` can take a fast path that imports neither typer
nor boto3 (dbops.cli.fastpath); everything else goes through the typer application.

Once a command has finished, the process ends without tearing the interpreter down
(:func:`finish`): freeing every object of botocore's service models, psycopg and typer one by
one took 0.2-0.3 s after each command's last line (measured on a restore), time a script waiting
for dbops pays and nothing needs.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    from dbops.cli import fastpath

    code = fastpath.try_fast(args)
    if code is not None:
        sys.exit(code)
    from dbops.cli.app import app

    try:
        app(args=args, prog_name="dbops")
    except SystemExit as e:
        finish(e.code)
    finish(0)


def finish(code: object) -> None:
    """End the process with ``code`` as ``sys.exit`` would, minus the interpreter's teardown: the
    exit handlers run (logging's flush among them) and stdout/stderr are flushed, then ``os._exit``.
    Anything unusual takes the ordinary ``sys.exit``: a code that is not a number (a message), a
    thread still running (the interpreter would wait for it), a flush that fails (the interpreter
    reports a closed pipe its own way), a Python without ``atexit._run_exitfuncs``, a profiler or
    tracer watching (``python -m cProfile -m dbops``, coverage: they write their data after this)."""
    import atexit
    import os
    import threading

    status = 0 if code is None else code
    run_handlers = getattr(atexit, "_run_exitfuncs", None)
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    watched = sys.getprofile() is not None or sys.gettrace() is not None
    if not isinstance(status, int) or isinstance(status, bool) or others or run_handlers is None or watched:
        sys.exit(code)
    run_handlers()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        sys.exit(code)
    os._exit(status & 0xFF)
