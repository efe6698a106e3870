"""The WAL archive as a restore sees it.

* one LIST gives every archived segment and history file (:func:`inventory`);
* the history of the target timeline gives the chain of timelines replay follows, and from a
  backup's redo segment the segments it needs, where that run of segments ends, and any hole
  in it (:func:`wal_range`);
* ``pg_waldump`` on the last archived segments tells where the archive really ends: the last
  record, and the last commit with its time (:func:`scan_end`). A time target is reachable only
  when some commit after it is archived: PostgreSQL stops at the first commit past the target
  and cannot know the target was reached before it sees one.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path


from dbops import proc
from dbops.errors import DbopsError, NotFoundError, ValidationError
from dbops.ops.restore import conf as rconf
from dbops.pg import walchain
from dbops.ops.wal.archive import WalArchive, decode_verified
from dbops.pg import binaries, waldump
from dbops.pg.lsn import (
    HISTORY_RE,
    SEGMENT_RE,
    parse_history,
    parse_segment_name,
    segment_name,
    segno_of_lsn,
)
from dbops.storage.base import ObjectInfo, ObjectStore
from dbops.storage.layout import Layout

SCAN_LIMIT = 32  # segments read back from the end of the archive looking for the last commit



@dataclass
class Inventory:
    """Every archived segment (name -> object info) and the timelines that have a history file."""

    seg_size: int
    segments: dict[str, ObjectInfo] = field(default_factory=dict)
    histories: set[int] = field(default_factory=set)
    history_times: dict[int, float] = field(default_factory=dict)  # timeline -> its history file's Last-Modified

    def timelines(self) -> set[int]:
        return {int(n[:8], 16) for n in self.segments} | self.histories | ({1} if self.segments else set())

    def latest_timeline(self) -> int | None:
        t = self.timelines()
        return max(t) if t else None

    def newest_on(self, timeline: int) -> str | None:
        prefix = f"{timeline:08X}"
        names = [n for n in self.segments if n.startswith(prefix)]
        return max(names) if names else None


def inventory(store: ObjectStore, layout: Layout, seg_size: int) -> Inventory:
    inv = Inventory(seg_size)
    for o in store.list(layout.wal_prefix()):
        name = layout.wal_name_of(o.key) or ""
        if SEGMENT_RE.match(name):
            inv.segments[name] = o
        elif HISTORY_RE.match(name):
            inv.histories.add(int(name[:8], 16))
            inv.history_times[int(name[:8], 16)] = o.last_modified
    return inv


def chain(arc: WalArchive, timeline: int) -> list[walchain.Span]:
    """The spans of timelines that lead to `timeline` (oldest first), from its history file."""
    if timeline <= 1:
        return walchain.chain(1, [])
    try:
        history = parse_history(arc.read_small(walchain.history_name(timeline)).decode(errors="replace"))
    except NotFoundError:
        raise ValidationError(f"timeline {timeline}'s history file {walchain.history_name(timeline)} is missing "
                              "from the archive", hint="replay cannot follow the timeline switch without it") from None
    return walchain.chain(timeline, history)


def timeline_at(spans: list[walchain.Span], lsn: int) -> int:
    """The timeline of the chain that holds `lsn`."""
    for sp in spans:
        if sp.end is None or lsn < sp.end:
            return sp.timeline
    return spans[-1].timeline


def on_chain(spans: list[walchain.Span], timeline: int, lsn: int) -> bool:
    """Whether a point (timeline, LSN) lies on the history that leads to the chain's last timeline."""
    for sp in spans:
        if sp.timeline == timeline:
            return sp.end is None or lsn <= sp.end
    return False


@dataclass
class WalRange:
    """The segments replay needs from a start to the newest archived one on the target timeline."""

    needed: list[str]
    present: int  # needed[:present] are all archived
    holes: list[str]  # missing segments with archived ones after them

    @property
    def contiguous(self) -> list[str]:
        return self.needed[:self.present]

    @property
    def end(self) -> str | None:
        return self.needed[self.present - 1] if self.present else None


def wal_range(inv: Inventory, spans: list[walchain.Span], start_segment: str) -> WalRange:
    target_tli = spans[-1].timeline
    seg = inv.seg_size
    candidates = [segment_name(target_tli, segno_of_lsn(spans[-1].begin, seg), seg)]
    if inv.newest_on(target_tli):
        candidates.append(inv.newest_on(target_tli))
    s_tli, s_no = parse_segment_name(start_segment, seg)
    if s_tli == target_tli:
        candidates.append(start_segment)
    end = max(candidates, key=lambda n: parse_segment_name(n, seg)[1])
    needed = walchain.needed_segments(start_segment, end, spans, seg)
    present = 0
    while present < len(needed) and needed[present] in inv.segments:
        present += 1
    last_archived = max((i for i, n in enumerate(needed) if n in inv.segments), default=-1)
    holes = [n for n in needed[present:last_archived + 1] if n not in inv.segments]
    return WalRange(needed, present, holes)


# --------------------------------------------------------------------------- pg_waldump


@dataclass(frozen=True)
class Commit:
    lsn: int
    time: float
    segment: str


@dataclass(frozen=True)
class WalEnd:
    """What the last archived segment of a run holds."""

    segment: str
    last_lsn: int  # start of the last valid record
    end_lsn: int  # just past it
    commit: Commit | None  # the last commit (or abort) found reading back from the end


def _records(path: Path, bin_dir: str | None) -> list[waldump.Record]:
    """Every valid record in one segment."""
    res = proc.run([binaries.binary("pg_waldump", bin_dir), str(path)], env=waldump.ENV,
                   check=False, timeout=300, what="pg_waldump")
    out = waldump.records(res.stdout)
    if not out and res.returncode != 0:
        raise ValidationError(f"pg_waldump cannot read archived segment {path.name}",
                              detail=(res.stderr or res.stdout)[-1500:])
    return out


def last_xact_end(records: list[waldump.Record], segment: str) -> Commit | None:
    """The last transaction end (commit or abort) among a segment's records, with its time."""
    for rec in reversed(records):
        x = waldump.xact_end(rec)
        if x is not None:
            return Commit(x.lsn, x.time, segment)
    return None


def scan_end(arc: WalArchive, run: list[str], cache: Path, *, seg_size: int, stop_before: int = 0,
             bin_dir: str | None = None) -> WalEnd | None:
    """Read the run of segments back from its end until a commit turns up (at most SCAN_LIMIT
    segments, never before segment number `stop_before`). Segments are fetched into `cache`
    (kept there: a restore replays them next)."""
    if not run:
        return None
    end: WalEnd | None = None
    for name in list(reversed(run))[:SCAN_LIMIT]:
        if parse_segment_name(name, seg_size)[1] < stop_before:
            break
        path = cache / name
        if not path.exists():
            arc.fetch(name, path)
        records = _records(path, bin_dir)
        if end is None:
            if not records:
                raise ValidationError(f"archived segment {name} holds no valid WAL record")
            last = records[-1]
            end = WalEnd(name, last.lsn, last.end_guess, None)
        commit = last_xact_end(records, name)
        if commit:
            return WalEnd(end.segment, end.last_lsn, end.end_lsn, commit)
    return end


# --------------------------------------------------------------------------- fetching ahead


def window(restore_wal_ahead: int, mapped: bool, seg_size: int) -> int | None:
    """How many segments a restore fetches ahead of replay (``backup.restore_wal_ahead``). None with a
    tablespace map (``mapped``): a tablespace the WAL creates may be mapped to a folder the server
    must see at its recorded location, mounted as it starts, so all the WAL is read before."""
    return None if mapped else max(2, restore_wal_ahead // seg_size)


WINDOW_POLL = 0.05  # how often a fetch held back by the window looks again at how far replay has come


@dataclass
class FetchStats:
    segments: int = 0
    bytes: int = 0
    missing: list[str] = field(default_factory=list)
    seconds: float = 0.0


class WalAhead:
    """Fetches the segments replay is expected to need into a cache folder while the server runs.

    :meth:`prepare` writes the history files and a marker in ``cache/.pending`` for every segment
    still to come; :meth:`run` (in a thread) downloads them (``parallel`` at a time, oldest first),
    verified against their SHA-256, into ``cache/.staged``, and releases them oldest first: each
    run of consecutive segments in place is handed to ``scan`` (with the one released before it,
    for a record that began there), then hard-linked into the cache under its own name and its
    marker removed. The server's restore_command waits while a segment it asks for is pending, so
    the server may start before the WAL is all here and replay never reads a segment ``scan`` has
    not read (the restore reads it for CREATE TABLESPACE: each such tablespace gets its folder
    before replay can create it, :mod:`dbops.ops.restore.run`). The cache is scratch space, thrown
    away after the restore, so nothing is fsynced.

    ``window``: the most segments fetched ahead of the one replay last asked for (its restore_command
    leaves each name it asks for in ``cache/.asked``); segments more than two behind it are removed
    (replay never asks for them again, and one it reads in place keeps its pg_wal name). So the
    scratch folder holds at most ``held(window)`` segments (None: every segment, fetched as fast as
    they come).

    A segment that is missing or fails verification, or a run ``scan`` refuses, is released with
    nothing after it: the markers go (replay then finds it "not there"); :meth:`check` raises the
    error of the oldest failed one (``scan``'s refusal is also kept as ``scan_error``), for when
    replay stopped short, and any other failure of the fetch (a full disk) as it was raised.
    """

    def __init__(self, store: ObjectStore, layout: Layout, names: list[str], cache: Path, *, parallel: int,
                 owner: tuple[int, int] | None = None, scan: Callable[[list[str], Path], None] | None = None,
                 window: int | None = None):
        self.arc = WalArchive(store, layout)
        self.store, self.layout = store, layout
        self.names, self.cache, self.parallel, self.owner = names, cache, max(1, parallel), owner
        self.pending = cache / rconf.PENDING_DIR
        self.staged = cache / rconf.STAGED_DIR
        self.asked = cache / rconf.ASKED_DIR
        self.scan, self.window = scan, window
        self._index = {n: i for i, n in enumerate(names)}
        self._at = -1  # the index of the newest segment replay asked for
        self._pruned = 0  # names[:_pruned] removed
        self.stats = FetchStats()
        self.failed: dict[str, DbopsError] = {}
        self.scan_error: DbopsError | None = None
        self.crashed: BaseException | None = None
        self._placed: set[str] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()

    @staticmethod
    def held(names: list[str], window: int | None) -> list[str]:
        """The most of names the cache holds at once with this window."""
        return names if window is None else names[:window + 3]

    def prepare(self, histories: list[int]) -> None:
        self.pending.mkdir(exist_ok=True)
        self.staged.mkdir(exist_ok=True)
        self.asked.mkdir(mode=0o700, exist_ok=True)
        for p in self.asked.iterdir():  # an earlier attempt's server's
            p.unlink()
        if self.owner:  # the server's restore_command writes there
            os.chown(self.asked, *self.owner)
        for tli in histories:
            name = walchain.history_name(tli)
            if not (self.cache / name).exists():
                self._place(self.cache / name, self.arc.read_small(name))
        for name in self.names:
            held = self.cache / name
            if held.exists():  # read by the plan, or released by an earlier attempt: read again before release
                if (self.staged / name).exists():
                    held.unlink()
                else:
                    os.replace(held, self.staged / name)
            (self.pending / name).touch()

    def run(self) -> FetchStats:
        t0 = time.monotonic()
        try:
            with ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="dbops-walahead") as pool:
                jobs = [pool.submit(self._one, n) for n in self.names]
                try:
                    self._release(jobs)
                except BaseException as e:  # noqa: BLE001  raised by check() where replay waits for it
                    self.crashed = e
                    raise
                finally:
                    self._stop.set()  # the downloads not started yet are not started
        finally:
            self.stop()
            self.stats.seconds = round(time.monotonic() - t0, 3)
        return self.stats

    def _release(self, jobs: list[Future]) -> None:
        """Release the segments in order (see the class docstring) until one is not in place."""
        prev: str | None = None
        i = 0
        while i < len(self.names) and not self._stop.is_set():
            jobs[i].result()  # a fetch's own failure is recorded by _one; anything else is raised here
            if self.names[i] not in self._placed:
                return  # missing or damaged: replay cannot go past it
            j = i + 1
            while j < len(self.names) and jobs[j].done() and self.names[j] in self._placed:
                j += 1
            run = self.names[i:j]
            if self.scan is not None:
                try:
                    self.scan(([prev] if prev is not None and prev[:8] == run[0][:8] else []) + run, self.staged)
                except DbopsError as e:
                    with self._lock:
                        self.failed[run[0]] = e
                        self.scan_error = e
                    return
            for name in run:
                if self._stop.is_set():
                    return
                os.link(self.staged / name, self.cache / name)
                (self.pending / name).unlink(missing_ok=True)
            prev, i = run[-1], j

    def stop(self) -> None:
        """No more downloads or releases; clear the markers so nothing waits for them."""
        self._stop.set()
        for p in self.pending.glob("*"):
            p.unlink(missing_ok=True)

    def check(self) -> None:
        if self.crashed is not None:
            raise self.crashed
        if self.failed:
            raise self.failed[min(self.failed)]

    def _replay_at(self) -> int:
        """The index of the newest segment replay asked for; what is two behind it is removed."""
        with self._lock:
            names = os.listdir(self.asked)
            for n in names:  # read once: the folder stays small however long the replay
                (self.asked / n).unlink(missing_ok=True)
            self._at = max([self._at, *(self._index.get(n, -1) for n in names)])
            while self._pruned < self._at - 2:
                name = self.names[self._pruned]
                (self.cache / name).unlink(missing_ok=True)
                (self.staged / name).unlink(missing_ok=True)
                self._pruned += 1
            return self._at

    def _one(self, name: str) -> None:
        dest = self.staged / name
        if self.window is not None:
            while self._index[name] - self._replay_at() > self.window:
                if self._stop.wait(WINDOW_POLL):
                    return
        if self._stop.is_set():
            return
        try:
            if not dest.exists():
                size = self._fetch(name, dest)
            else:
                size = dest.stat().st_size
        except NotFoundError:
            with self._lock:
                self.stats.missing.append(name)
            return
        except DbopsError as e:
            with self._lock:
                self.failed[name] = e
            return
        with self._lock:
            self._placed.add(name)
            self.stats.segments += 1
            self.stats.bytes += size

    def _fetch(self, name: str, dest: Path) -> int:
        key = self.layout.wal_key(name)
        raw = dest.with_name(f".{name}.download")
        part = dest.with_name(f".{name}.part")
        try:
            info = self.store.get_to_file(key, str(raw))
            _, size = decode_verified(raw, part, info.metadata, f"{name} ({key})", fsync=False,
                                      hint="the stored segment is damaged; restore to a point before it")
            if self.owner:
                os.chown(part, *self.owner)
            os.replace(part, dest)
        finally:
            raw.unlink(missing_ok=True)
            part.unlink(missing_ok=True)
        return size

    def _place(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.part")
        tmp.write_bytes(data)
        if self.owner:
            os.chown(tmp, *self.owner)
        os.replace(tmp, path)
