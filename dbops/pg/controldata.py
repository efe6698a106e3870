"""pg_controldata, parsed (with LANG=C so the labels are English)."""

from __future__ import annotations

from dataclasses import dataclass

from dbops import proc
from dbops.pg import binaries
from dbops.pg.lsn import parse_lsn


@dataclass(frozen=True)
class ControlData:
    raw: dict[str, str]

    @property
    def system_identifier(self) -> str:
        return self.raw["Database system identifier"]

    @property
    def state(self) -> str:
        return self.raw["Database cluster state"]

    @property
    def checkpoint_lsn(self) -> int:
        return parse_lsn(self.raw["Latest checkpoint location"])

    @property
    def redo_lsn(self) -> int:
        return parse_lsn(self.raw["Latest checkpoint's REDO location"])

    @property
    def timeline(self) -> int:
        return int(self.raw["Latest checkpoint's TimeLineID"])

    @property
    def min_recovery_end_lsn(self) -> int:
        return parse_lsn(self.raw.get("Minimum recovery ending location", "0/0"))

    @property
    def min_recovery_end_timeline(self) -> int:
        return int(self.raw.get("Min recovery ending loc's timeline", "0"))

    @property
    def data_checksums(self) -> bool:
        return self.raw.get("Data page checksum version", "0") != "0"

    @property
    def wal_log_hints(self) -> bool:
        return self.raw.get("wal_log_hints setting", "off") == "on"

    @property
    def wal_segment_size(self) -> int:
        return int(self.raw.get("Bytes per WAL segment", str(16 * 1024 * 1024)))

    @property
    def version(self) -> int:
        return int(self.raw.get("pg_control version number", "0"))

    @property
    def checkpoint_time(self) -> str:
        return self.raw.get("Time of latest checkpoint", "")


def parse(text: str) -> ControlData:
    raw: dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            raw[k.strip()] = v.strip()
    return ControlData(raw)


def read(data_dir: str, *, bin_dir: str | None = None, user: str | None = None) -> ControlData:
    res = proc.run(
        [binaries.binary("pg_controldata", bin_dir), "-D", data_dir],
        env={"LANG": "C", "LC_ALL": "C"},
        user=user,
        timeout=30,
    )
    return parse(res.stdout)
