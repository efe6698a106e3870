"""What a restore aims at: a point in time, an LSN, a transaction, a named restore point, or the
end of the archive; and how each becomes PostgreSQL's ``recovery_target_*`` settings.

A timestamp must carry its zone: ``2026-11-25T15:46:00+01:00`` or ``2026-11-25T14:46:00Z``.
One without a zone is refused rather than guessed as local time or UTC.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from dbops.errors import UsageError
from dbops.pg.lsn import format_lsn, parse_lsn

TIME, LSN, XID, NAME, LATEST = "time", "lsn", "xid", "name", "latest"
FINAL_STATES = ("promote", "pause", "shutdown")

ZONE_HINT = ("write the zone: 2026-11-25T15:46:00+01:00 (an offset) or 2026-11-25T14:46:00Z (UTC); "
             "`date -Iseconds` prints the current time that way")


def parse_time(text: str) -> datetime:
    """An ISO 8601 timestamp with a zone, as an aware datetime. UsageError without a zone."""
    raw = text.strip()
    try:
        when = datetime.fromisoformat(raw[:-1] + "+00:00" if raw[-1:] in ("Z", "z") else raw)
    except ValueError:
        raise UsageError(f"{text!r} is not an ISO 8601 timestamp", hint=ZONE_HINT) from None
    if when.tzinfo is None or when.utcoffset() is None:
        raise UsageError(f"the timestamp {text!r} has no time zone; refusing to guess between local time and UTC",
                         hint=ZONE_HINT)
    return when


def iso_utc(epoch: float | None) -> str | None:
    """Epoch seconds as ISO 8601 in UTC with microseconds, e.g. 2026-11-25T14:46:00.123456Z."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class RestoreTarget:
    kind: str  # time | lsn | xid | name | latest
    value: str = ""  # as given (xid, name) or normalised (time in UTC, LSN)
    epoch: float | None = None  # time targets
    lsn: int | None = None  # lsn targets (and latest, once the end of the archive is known)
    inclusive: bool = True  # stop just after the target (False: just before it)

    def describe(self) -> str:
        how = "" if self.inclusive else " (exclusive)"
        if self.kind == LATEST:
            return "the end of the archive"
        shown = iso_utc(self.epoch) if self.kind == TIME else self.value
        return {TIME: "time", LSN: "LSN", XID: "transaction", NAME: "restore point"}[self.kind] + f" {shown}{how}"

    def settings(self) -> dict[str, str]:
        """recovery_target_* for this target (latest needs its LSN resolved first)."""
        s = {"recovery_target_inclusive": "on" if self.inclusive else "off"}
        if self.kind == TIME:
            s["recovery_target_time"] = self.value
        elif self.kind in (LSN, LATEST):
            if self.lsn is None:
                raise ValueError("the end of the archive must be resolved to an LSN first")
            s["recovery_target_lsn"] = format_lsn(self.lsn)
        elif self.kind == XID:
            s["recovery_target_xid"] = self.value
        else:
            s["recovery_target_name"] = self.value
        return s

    def as_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value, "inclusive": self.inclusive,
                "time": iso_utc(self.epoch), "lsn": format_lsn(self.lsn) if self.lsn is not None else None}


def from_options(*, to: str | None = None, to_lsn: str | None = None, to_xid: str | None = None,
                 to_name: str | None = None, exclusive: bool = False) -> RestoreTarget:
    """Exactly one of the target options, checked and normalised."""
    given = [(k, v) for k, v in (("--to", to), ("--to-lsn", to_lsn), ("--to-xid", to_xid), ("--to-name", to_name))
             if v is not None]
    if len(given) != 1:
        raise UsageError("give exactly one restore target: --to TIMESTAMP|latest, --to-lsn, --to-xid or --to-name",
                         detail=f"given: {', '.join(k for k, _ in given)}" if given else None,
                         hint="example: --to 2026-11-25T15:46:00+01:00")
    inclusive = not exclusive
    if to is not None:
        if to.strip().lower() == "latest":
            if exclusive:
                raise UsageError("--exclusive does not apply to --to latest")
            return RestoreTarget(LATEST, "latest")
        when = parse_time(to)
        utc = when.astimezone(timezone.utc)
        return RestoreTarget(TIME, utc.isoformat(sep=" ", timespec="microseconds"), epoch=utc.timestamp(),
                             inclusive=inclusive)
    if to_lsn is not None:
        try:
            lsn = parse_lsn(to_lsn)
        except ValueError as e:
            raise UsageError(str(e)) from None
        return RestoreTarget(LSN, format_lsn(lsn), lsn=lsn, inclusive=inclusive)
    if to_xid is not None:
        if not to_xid.strip().isdigit() or int(to_xid) < 3:
            raise UsageError(f"--to-xid needs a transaction id (a number of 3 or more), got {to_xid!r}")
        return RestoreTarget(XID, str(int(to_xid)), inclusive=inclusive)
    name = (to_name or "").strip()
    if not name or len(name) > 63:
        raise UsageError("--to-name needs a restore point name of 1 to 63 characters "
                         "(as given to pg_create_restore_point)")
    return RestoreTarget(NAME, name, inclusive=inclusive)


LATEST_TIMELINE = 0  # --timeline latest: the numerically highest timeline, as PostgreSQL's 'latest'


def parse_timeline(text: str | None) -> int | None:
    """--timeline: None for auto (see ops.restore.timeline), LATEST_TIMELINE for latest, else a number."""
    if text is None or text.strip().lower() in ("", "auto"):
        return None
    if text.strip().lower() == "latest":
        return LATEST_TIMELINE
    t = text.strip()
    try:
        n = int(t, 16) if t.lower().startswith("0x") else int(t)
    except ValueError:
        raise UsageError(f"--timeline takes 'auto', 'latest' or a timeline number, got {text!r}") from None
    if n < 1:
        raise UsageError(f"timeline numbers start at 1, got {n}")
    return n
