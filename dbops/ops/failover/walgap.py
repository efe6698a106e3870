"""After a `--primary-lost` promotion: archive the old timeline's segments only the standbys had.

A standby with ``archive_mode = on`` does not archive the WAL it receives (only ``always``
does), and the dead primary's archiver was behind. So the segments between the archive's
newest one and the switch point exist only in the new primary's ``pg_wal``: without them no
backup taken before the failure could be replayed across the new timeline, and a backup's
validation would find a gap. They are pushed with the node's own ``archive_command`` (run as
the data folder's owner, ``%p`` an absolute path); an identical object already in the archive
counts as archived. The segment holding the switch point is PostgreSQL's to archive (as
``.partial``, and on the new timeline).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any

from dbops.config import Node
from dbops.errors import DbopsError
from dbops.nodes import NodeController
from dbops.pg.lsn import parse_segment_name, segment_name


@dataclass
class GapResult:
    pushed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # not in pg_wal any more (recycled)
    failed: list[str] = field(default_factory=list)  # "name: why"


def restore_command_for(archive_command: str) -> str | None:
    """`dbops ... wal-fetch %f %p` from a node's `dbops ... wal-push %p` archive_command (same binary, config)."""
    if "wal-push %p" not in archive_command:
        return None
    return archive_command.replace("wal-push %p", "wal-fetch %f %p")


def command_for(archive_command: str, path: str, name: str) -> str:
    """archive_command with %p, %f and %% expanded the way PostgreSQL does (paths shell-quoted)."""
    out, i = [], 0
    while i < len(archive_command):
        ch = archive_command[i]
        if ch == "%" and i + 1 < len(archive_command):
            nxt = archive_command[i + 1]
            if nxt in "pf%":
                out.append(shlex.quote(path) if nxt == "p" else shlex.quote(name) if nxt == "f" else "%")
                i += 2
                continue
        out.append(ch)
        i += 1
    return "".join(out)


def segments_between(timeline: int, after: str, switch: int, seg_size: int) -> list[str]:
    """Segment names on `timeline` after the archived `after`, up to the one before the switch point's."""
    _, first = parse_segment_name(after, seg_size)
    last = switch // seg_size - 1
    return [segment_name(timeline, n, seg_size) for n in range(first + 1, last + 1)]


def archive_received(ctl: NodeController, data_dir: str, archive_command: str, names: list[str],
                     timeout: float) -> GapResult:
    res = GapResult()
    for name in names:
        path = f"{data_dir.rstrip('/')}/pg_wal/{name}"
        if ctl.run(["test", "-f", path], timeout=30, check=False).returncode != 0:
            res.missing.append(name)
            continue
        try:
            out = ctl.run(["sh", "-c", command_for(archive_command, path, name)], timeout=timeout, check=False)
        except DbopsError as e:
            res.failed.append(f"{name}: {e.message}")
            continue
        if out.returncode != 0:
            res.failed.append(f"{name}: archive_command exited {out.returncode}: "
                              f"{(out.stderr or out.stdout).strip()[-300:]}")
        else:
            res.pushed.append(name)
    return res


def archive_gap(archive: Any, archive_command: str, node: Node, switch: int | None, old_timeline: int,
                timeout: float) -> tuple[GapResult, str]:
    """Push the segments between the archive's newest one (as read before the promotion) and the
    switch point from the new primary; returns what happened and a one-line summary."""
    from dbops.nodes import open_controller

    a = archive
    if not (a.checked and a.segment and switch and "wal-push" in archive_command and node.data_dir):
        return GapResult(), "skipped: " + ("the archive was not read" if not a.checked else "no archived segment to "
                                           "start from" if not a.segment else "no dbops archive_command or switch point")
    names = segments_between(old_timeline, a.segment, switch, a.seg_size)
    res = archive_received(open_controller(node), node.data_dir, archive_command, names, timeout)
    return res, (f"{len(res.pushed)} of {len(names)} segment(s) archived" if names else "nothing missing")


__all__ = ["GapResult", "archive_gap", "archive_received", "command_for", "restore_command_for", "segments_between"]
