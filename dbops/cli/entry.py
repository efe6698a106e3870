"""Process entry point: `dbops ...`.

Kept tiny so `dbops wal-push` / `wal-fetch` can take a fast path that imports neither typer
nor boto3 (dbops.cli.fastpath); everything else goes through the typer application.
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

    app(args=args, prog_name="dbops")
