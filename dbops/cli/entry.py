"""Process entry point: `dbops ...`.

Kept tiny so `dbops wal-push` can take a fast path that imports neither typer nor
boto3 (see dbops.ops.walpush_fast, when present).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        from dbops.ops import fastpath  # optional fast path for archive_command
    except ImportError:  # pragma: no cover
        fastpath = None
    if fastpath is not None:
        code = fastpath.try_fast(args)
        if code is not None:
            sys.exit(code)
    from dbops.cli.app import app

    app(args=args, prog_name="dbops")
