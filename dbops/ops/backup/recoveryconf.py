"""The throwaway server's recovery settings and files: what validation starts a copy with
(:func:`dbops.ops.backup.validate.recover_to_target`)."""

from __future__ import annotations

from pathlib import Path

from dbops import proc
from dbops.pg import controldata


RECOVERY_SETTINGS_BASE = {
    "hot_standby": "on",
    "recovery_target_action": "pause",
    "recovery_target_inclusive": "on",
    # A copy of production must not need production's memory or extensions.
    "shared_buffers": "256MB",
    "huge_pages": "off",
    "shared_preload_libraries": "",
    "max_wal_size": "4GB",  # no restartpoints forced by WAL volume while replaying
    # The scratch copy is thrown away if the host crashes mid-run; what is stored is read after a
    # clean shutdown, from the page cache. So no fsync: replay and the shutdown restartpoint are
    # bound by the CPU, not by the disk's flush rate.
    "fsync": "off",
    "maintenance_io_concurrency": "32",
    # The checks' table reads are plain scans: compiling them (JIT) costs more than it saves.
    "jit": "off",
    # Hint bits set by the checks must not reach the stored pages: with this on, a server in
    # recovery never writes a page only for its hint bits, so a page whose LSN is not newer
    # than the previous backup's REDO point is byte for byte what that backup stored (the
    # store reuses it without hashing; see dbops/repo/blocks.py).
    "wal_log_hints": "on",
    # Every page read from disk has its checksum verified, a bad one an error (never a warning, never
    # zeroed), whatever the source's configuration says: pg_checksums leaves those pages to the server
    # (dbops.ops.backup.shadow), which tells from its log that the restart point was written.
    "ignore_checksum_failure": "off",
    "zero_damaged_pages": "off",
    "log_checkpoints": "on",
    # ... which it finds in the log's last lines: no line for each of the checks' statements
    "log_statement": "none",
    "log_min_duration_statement": "-1",
}
# PostgreSQL 15+. allow_in_place_tablespaces: replaying a CREATE DATABASE in a tablespace that a later
# DROP removed makes recovery create the folder inside pg_tblspc; without it that stops recovery.
RECOVERY_SETTINGS_PG15 = {"recovery_prefetch": "try", "allow_in_place_tablespaces": "on"}


# Hot standby refuses to start when these are below the source's values (pg_control keeps them).
_STANDBY_MINIMUMS = {
    "max_connections": "max_connections setting",
    "max_worker_processes": "max_worker_processes setting",
    "max_wal_senders": "max_wal_senders setting",
    "max_prepared_transactions": "max_prepared_xacts setting",
    "max_locks_per_transaction": "max_locks_per_xact setting",
}


def standby_minimums(data: Path) -> dict[str, str]:
    """Settings a throwaway hot standby needs from the source, read from the copy's pg_control.

    They matter when the source keeps its configuration outside the data folder (Debian's
    /etc/postgresql), so the copy would otherwise start on defaults. Messages and formats in
    the C locale, which every image has."""
    cd = controldata.read(str(data))
    out = {k: cd.raw[v] for k, v in _STANDBY_MINIMUMS.items() if cd.raw.get(v, "").isdigit()}
    out.update({"lc_messages": "C", "lc_monetary": "C", "lc_numeric": "C", "lc_time": "C"})
    return out


def pg_major(data: Path) -> int:
    try:
        return int((data / "PG_VERSION").read_text().strip().split(".")[0])
    except (OSError, ValueError):
        return 0


def write_recovery_signal(data: Path, owner: str) -> None:
    p = data / "recovery.signal"
    p.write_text("")
    proc.chown_to(p, owner)
    for stale in ("standby.signal", "backup_label.old"):
        (data / stale).unlink(missing_ok=True)
