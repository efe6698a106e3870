"""Which WAL segments a replay needs, following timeline history (pure functions).

A timeline's history file lists every ancestor and the LSN where it was left. Replay
of segment number N uses the newest timeline that had begun by N: the segment that
holds a switch point is read from the new timeline (it carries the old timeline's
records up to the switch), so the old timeline is needed up to the segment before.
"""

from __future__ import annotations

from dataclasses import dataclass

from dbops.errors import ValidationError
from dbops.pg.lsn import (
    DEFAULT_SEGMENT_SIZE,
    parse_segment_name,
    segment_name,
    segno_of_lsn,
)


@dataclass(frozen=True)
class Span:
    timeline: int
    begin: int  # LSN where the timeline begins (0 for the first)
    end: int | None  # LSN where it was left for the next one; None for the target timeline


def history_name(timeline: int) -> str:
    return f"{timeline:08X}.history"


def chain(timeline: int, history: list[tuple[int, int, str]]) -> list[Span]:
    """The spans (oldest first) that lead to `timeline`, from its parsed history file."""
    spans: list[Span] = []
    begin = 0
    for parent, switch, _reason in history:
        spans.append(Span(parent, begin, switch))
        begin = switch
    spans.append(Span(timeline, begin, None))
    return spans


def needed_segments(start: str, end: str, spans: list[Span], seg_size: int = DEFAULT_SEGMENT_SIZE) -> list[str]:
    """Every segment name replay needs from segment `start` through segment `end` (inclusive).

    `end` must be on the chain's last timeline; `start` on one of its timelines.
    """
    s_tli, s = parse_segment_name(start[:24], seg_size)
    e_tli, e = parse_segment_name(end[:24], seg_size)
    if not spans or spans[-1].timeline != e_tli:
        raise ValueError(f"the timeline chain does not end on timeline {e_tli}")
    if s_tli not in {sp.timeline for sp in spans}:
        raise ValidationError(
            f"{start} is on timeline {s_tli}, which is not an ancestor of timeline {e_tli}",
            detail=f"history of timeline {e_tli}: " + " -> ".join(str(sp.timeline) for sp in spans),
            hint="the archive holds a diverged branch; replay from a start on this timeline's history",
        )
    names: list[str] = []
    for sp in spans:
        if sp.timeline < s_tli:
            continue
        first = segno_of_lsn(sp.begin, seg_size)
        last = e if sp.end is None else segno_of_lsn(sp.end, seg_size) - 1
        for n in range(max(first, s), min(last, e) + 1):
            names.append(segment_name(sp.timeline, n, seg_size))
    return names
