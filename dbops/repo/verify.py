"""`dbops verify`: re-read every stored block a backup needs and report every bad object.

The backup is checked a batch of files at a time (``ranges.BATCH_BLOCKS`` blocks): its whole
blocks (page deltas' bases included), then its page deltas. A page delta compressed against its
base (format 5) is checked by decoding it with its base block's pages: kept from the batch's
whole-block pass (up to ``KEEP_BYTES`` of them, only the pages each delta replaces), else fetched
again (:mod:`dbops.repo.bases`, a batch of deltas at a time); a base that is missing or damaged
is reported once, by the check of the whole blocks."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import closing
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from dbops.errors import DamagedObjectError, NotFoundError, ValidationError
from dbops.repo import blocks, codec
from dbops.repo.bases import BATCH_BYTES, BaseReader
from dbops.repo.manifest import ChunkRef, FileEntry, Manifest
from dbops.repo.ranges import (IN_FLIGHT_BYTES, ByteBudget, Frame, Range, Run, base_view, delta_view, frame_chunks,
                               frames_read, open_range, plan_ranges, run_bounded, view_batches)
from dbops.storage.base import ObjectStore
from dbops.storage.layout import Layout

KEEP_BYTES = 32 * 1024 * 1024  # base pages kept from a batch's whole blocks for its page deltas, at most

# Where a stored block is (pack, frame offset, offset in the frame), and a page mask.
_Place = tuple[str, int, int]


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

    # Of the batch being checked: the pages of bases its deltas need, kept as the whole blocks are read.
    wanted: dict[_Place, set[int]] = {}
    kept: dict[tuple[_Place, int], bytes] = {}
    kept_bytes = 0

    def keep(run: Run, raw: memoryview) -> None:
        nonlocal kept_bytes
        for c in run.refs:
            masks = wanted.get((c.pack, c.offset, c.at)) if c.pack is not None else None
            for mask in masks or ():
                pages = blocks.same_pages(raw[c.at - run.at:c.at - run.at + c.raw], mask)
                with lock:
                    if kept_bytes + len(pages) <= KEEP_BYTES:
                        kept[((c.pack, c.offset, c.at), mask)] = pages
                        kept_bytes += len(pages)

    def kept_base(ref: ChunkRef) -> bytes | None:
        """A delta's base block rebuilt from its kept pages (only those pages are read), or None."""
        assert ref.base is not None
        b = ref.base
        with lock:
            pages = kept.pop(((b.pack, b.offset, b.at), ref.mask), None)  # type: ignore[arg-type]
        if pages is None:
            return None
        block = bytearray(b.raw)
        for at, part in blocks.delta_writes(pages, ref.mask, b.raw):
            block[at:at + len(part)] = part
        return bytes(block)

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
                            bad_runs += _check_deltas(decoder, bases, deltas, kept_base)
                            deltas = []
                        continue
                    for run, raw, why in frame_chunks(decoder, fr, stored):
                        if raw is None:
                            bad_runs.append((run, why))
                        elif wanted:
                            keep(run, raw)
                bad_runs += _check_deltas(decoder, bases, deltas, kept_base)
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
        for batch in view_batches(manifest):  # a batch's whole blocks, then its deltas
            entries = [f for f, _ in batch]
            wanted.clear()
            kept.clear()
            kept_bytes = 0
            for f in entries:
                for c in f.chunks:
                    if c.mask and c.on_base and c.base is not None and c.base.pack is not None:
                        wanted.setdefault((c.base.pack, c.base.offset, c.base.at), set()).add(c.mask)
            whole = [base_view(f) for f in entries]
            run_bounded(pool, check, ((whole, r) for r in plan_ranges(manifest, whole)), 2 * workers)
            wanted.clear()
            with_deltas = [v for v in map(delta_view, entries) if v is not None]
            run_bounded(pool, check, ((with_deltas, r) for r in plan_ranges(manifest, with_deltas)), 2 * workers)
    report.objects = len(objects)
    for key in sorted(missing):
        report.problems.append(Problem(key, "object is missing", tuple(sorted(affected[key]))))
    for key in sorted(bad):
        reasons = bad[key]
        more = f" (and {len(reasons) - 1} more bad blocks)" if len(reasons) > 1 else ""
        report.problems.append(Problem(key, reasons[0] + more, tuple(sorted(affected[key]))))
    report.seconds = round(time.monotonic() - t0, 3)
    return report


def _check_deltas(decoder: codec.Decoder, bases: BaseReader, deltas: list[tuple[Frame, bytes]],
                  kept_base: Callable[[ChunkRef], bytes | None]) -> list[tuple[Run, str]]:
    """(run, why) for every damaged page delta of these frames, decoded with their bases (kept from
    the whole-block pass, else fetched again); a delta whose base cannot be read is left to the
    check of the base's own frame."""
    if not deltas:
        return []
    got: list[bytes | memoryview | None] = [kept_base(fr.ref) for fr, _ in deltas]
    again = [i for i, b in enumerate(got) if b is None]
    if again:
        for i, b in zip(again, bases.fetch([deltas[i][0].ref.base for i in again])):  # type: ignore[misc]
            got[i] = b
    bad = []
    for (fr, stored), base in zip(deltas, got):
        if base is not None:
            bad += [(run, why) for run, raw, why in frame_chunks(decoder, fr, stored, lambda _f, _r: base)
                    if raw is None]
    return bad
