"""`dbops verify`: re-read every stored block a backup needs and report every bad object.

A page delta compressed against its base (format 5) is checked by decoding it with its base
block, fetched again (:mod:`dbops.repo.bases`, a batch of deltas at a time); a base that is
missing or damaged is reported once, by the check of the whole blocks (bases included)."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import closing
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from dbops.errors import DamagedObjectError, NotFoundError, ValidationError
from dbops.repo import codec
from dbops.repo.bases import BATCH_BYTES, BaseReader
from dbops.repo.manifest import FileEntry, Manifest
from dbops.repo.ranges import (IN_FLIGHT_BYTES, ByteBudget, Frame, Range, Run, frame_chunks, frames_read, open_range,
                               planned, run_bounded)
from dbops.storage.base import ObjectStore
from dbops.storage.layout import Layout


@dataclass(frozen=True)
class Problem:
    key: str  # the object at fault
    reason: str
    files: tuple[str, ...] = ()  # some files whose content is affected


@dataclass
class VerifyReport:
    backup_id: str
    objects: int = 0
    chunks: int = 0
    fetched_bytes: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_backup(store: ObjectStore, layout: Layout, manifest: Manifest, parallel: int,
                  progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Re-read and hash every stored block the backup needs; report every bad object found.
    ``progress(done, total)``: stored bytes read so far, of about the backup's stored size."""
    t0 = time.monotonic()
    report = VerifyReport(manifest.backup_id)
    try:
        manifest.check()
    except ValidationError as e:
        report.problems.append(Problem(layout.manifest(manifest.backup_id), e.message))
        return report
    decoder = codec.Decoder()
    lock = threading.Lock()
    budget = ByteBudget(IN_FLIGHT_BYTES)
    bases = BaseReader(store, layout, ByteBudget(IN_FLIGHT_BYTES))  # its own budget: asked while frames are held
    total = manifest.referenced_bytes() if progress else 0
    objects: set[str] = set()  # one id per pack: small
    missing: set[str] = set()
    bad: dict[str, list[str]] = defaultdict(list)
    affected: dict[str, set[str]] = defaultdict(set)

    def note(key: str, paths: Iterable[str]) -> None:
        for p in paths:
            if len(affected[key]) >= 10:
                break
            affected[key].add(p)

    def check(item: tuple[list[FileEntry], Range]) -> None:
        files, rng = item
        key = layout.pack(rng.pack)
        with lock:
            objects.add(key)
            if key in missing:
                note(key, (files[run.file_no].path for fr in rng.frames for run in fr.runs))
                return
        fetched = 0
        bad_runs: list[tuple[Run, str]] = []
        try:
            with open_range(store, key, rng) as src, closing(frames_read(src, rng, budget)) as frames:
                deltas: list[tuple[Frame, bytes]] = []  # format 5 deltas waiting for their bases
                for fr, stored in frames:
                    fetched += len(stored)
                    if fr.ref.on_base and fr.ref.base is not None:
                        deltas.append((fr, bytes(stored)))
                        if len(deltas) * fr.ref.base.raw >= BATCH_BYTES:
                            bad_runs += _check_deltas(decoder, bases, deltas)
                            deltas = []
                        continue
                    bad_runs += [(run, why) for run, raw, why in frame_chunks(decoder, fr, stored) if raw is None]
                bad_runs += _check_deltas(decoder, bases, deltas)
        except NotFoundError:
            with lock:
                missing.add(key)
                note(key, (files[run.file_no].path for fr in rng.frames for run in fr.runs))
            return
        except DamagedObjectError as e:  # an encrypted segment failed its authentication tag
            bad_runs = [(run, e.message) for fr in rng.frames for run in fr.runs]
        with lock:
            report.chunks += sum(fr.chunks() for fr in rng.frames)
            report.fetched_bytes += fetched
            if progress:
                progress(report.fetched_bytes, max(total, report.fetched_bytes))
            for run, why in bad_runs:
                bad[key].append(why)
                note(key, [files[run.file_no].path])

    workers = max(1, parallel)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dbops-verify") as pool:
        run_bounded(pool, check, planned(manifest), 2 * workers)
    report.objects = len(objects)
    for key in sorted(missing):
        report.problems.append(Problem(key, "object is missing", tuple(sorted(affected[key]))))
    for key in sorted(bad):
        reasons = bad[key]
        more = f" (and {len(reasons) - 1} more bad blocks)" if len(reasons) > 1 else ""
        report.problems.append(Problem(key, reasons[0] + more, tuple(sorted(affected[key]))))
    report.seconds = round(time.monotonic() - t0, 3)
    return report


def _check_deltas(decoder: codec.Decoder, bases: BaseReader, deltas: list[tuple[Frame, bytes]]) -> list[tuple[Run, str]]:
    """(run, why) for every damaged page delta of these frames, decoded with their bases fetched
    again; a delta whose base cannot be read is left to the check of the base's own frame."""
    if not deltas:
        return []
    got = bases.fetch([fr.ref.base for fr, _ in deltas])  # type: ignore[misc]  # on_base deltas have one
    bad = []
    for (fr, stored), base in zip(deltas, got):
        if base is not None:
            bad += [(run, why) for run, raw, why in frame_chunks(decoder, fr, stored, lambda _f, _r: base)
                    if raw is None]
    return bad
