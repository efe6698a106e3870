"""The archive_command / restore_command fast path, taken before typer or boto3 is imported.

Recognised exactly (anything else goes the normal way, through the CLI):

    dbops [-c CONFIG | --config CONFIG] wal-push PATH           (or $DBOPS_CONFIG)
    dbops [-c CONFIG | --config CONFIG] wal-fetch NAME PATH

`wal-push` in async mode is handled here completely: answered from the spool when the
background pusher has stored the segment already, else by handing it to the pusher and
waiting (see dbops.ops.wal.spool). `wal-fetch` is answered here only when the segment is
in the prefetch spool. A configuration problem falls through, so the CLI reports it.
"""

from __future__ import annotations

import sys

_VERBS = {"wal-push": 1, "wal-fetch": 2}


def parse(args: list[str]) -> tuple[str | None, str, list[str]] | None:
    """(config path or None, verb, operands) when args are exactly one of the recognised forms."""
    config = None
    rest = list(args)
    if rest and rest[0] in ("-c", "--config") and len(rest) >= 2:
        config, rest = rest[1], rest[2:]
    elif rest and rest[0].startswith("--config="):
        config, rest = rest[0].split("=", 1)[1], rest[1:]
    if not rest or rest[0] not in _VERBS:
        return None
    verb, operands = rest[0], rest[1:]
    if len(operands) != _VERBS[verb] or any(not o or o.startswith("-") for o in operands):
        return None
    return config, verb, operands


def try_fast(args: list[str]) -> int | None:
    """An exit status when the fast path answered, else None (the CLI takes over)."""
    parsed = parse(args)
    if parsed is None:
        return None
    config_path, verb, operands = parsed
    from dbops import config as cfgmod
    from dbops import secrets
    from dbops.errors import DbopsError, exit_code_of
    from dbops.ops.wal import commands as walcmd

    try:
        cfg = cfgmod.load(config_path)
    except DbopsError:
        return None
    try:
        if verb == "wal-push":
            if not cfg.archive.async_push:
                return None
            walcmd.push(cfg, operands[0])
            return 0
        return 0 if walcmd.fetch_prefetched(cfg, operands[0], operands[1]) else None
    except DbopsError as e:
        sys.stderr.write(secrets.redact(e.render()) + "\n")
        return exit_code_of(e)
    except KeyboardInterrupt as e:
        return exit_code_of(e)
    except Exception:  # noqa: BLE001  a bug or an unexpected OS error: the CLI runs it again and reports it
        return None
