"""The order a restore reads a backup's ranges in, and which files are complete as they are written.

A restore reads the backup one batch of files at a time (:func:`dbops.repo.ranges.view_batches`,
``BATCH_BLOCKS`` blocks). A batch without page deltas is one set of ranges. A batch with page deltas
is two: its whole blocks (each delta's base block included: :func:`~dbops.repo.ranges.base_view`),
then its deltas' pages (:func:`~dbops.repo.ranges.delta_view`), written over the base blocks written
before (:func:`dbops.repo.blocks.delta_writes`). The batches are pipelined, not the passes over the
whole backup: the deltas of batch k are handed out as soon as batch k's whole blocks are written,
while batch k+1's whole blocks are already being read; so a file with deltas is complete (and
finished: fsynced, its mode and time set) as soon as its own batch is, not after the whole
backup's whole blocks.

A batch whose deltas are small (:data:`dbops.repo.held.HOLD_BYTES` of stored frames at most) is
read in one pass instead, when the consumer can fetch them (``hold``): its deltas' frames are
fetched when it is planned, held (:class:`dbops.repo.held.Held`) and applied over their bases in
memory as the batch's whole blocks are written; the batch is then only its whole-block ranges,
and nothing waits for its last base.

Memory: at most two batches' plans, and their held deltas (``HOLD_BYTES`` each at most); in two
passes nothing is held between the two ranges of a block (the base is on disk when its delta is
read, and read back from there).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator

from dbops.repo import held as heldmod
from dbops.repo.held import Held
from dbops.repo.manifest import FileEntry, Manifest
from dbops.repo.ranges import Frame, Range, base_view, delta_view, has_deltas, plan_ranges, view_batches

# hold(the batch's files as its delta ranges see them, a range of deltas) -> (its object's key, the
# range's (frame, stored bytes)), fetched (raises the restore's error for a missing or damaged object).
Hold = Callable[[list[FileEntry], Range], "tuple[str, Iterable[tuple[Frame, bytes | memoryview]]]"]


class Batch(list):
    """One batch's ranges still to write, per file (indexed like the batch's files); the batch's
    whole-block ranges not yet written (its deltas wait for them), and whether one failed;
    its deltas when they are held, to be applied over their bases as those are written."""

    def __init__(self, files: int):
        super().__init__([0] * files)
        self.bases_left = 0
        self.failed = False
        self.held: Held | None = None


Item = tuple[list[FileEntry], Range, Batch]


class Completion:
    """Hands out a backup's ranges in order (:meth:`planned`) and calls ``on_complete(entry)`` once per
    file with stored content, as soon as its last range is written (a file whose blocks are all
    zeros: when its batch is planned); from the planning thread or from a worker (serialised).
    The consumer reports every range it was handed: :meth:`written` once it is written, or
    :meth:`failed` when it could not be."""

    def __init__(self, on_complete: Callable[[FileEntry], None], hold: Hold | None = None):
        self.on_complete = on_complete
        self.hold = hold
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)

    def _plan(self, manifest: Manifest, pairs: list[tuple[FileEntry, FileEntry]]
              ) -> tuple[list[Item], list[Item], Batch]:
        """(whole-block items, page-delta items, the batch) of one batch; completes the files with
        nothing to read."""
        entries = [f for f, _ in pairs]
        bases = [base_view(f) for f in entries]
        left = Batch(len(entries))
        whole = [(bases, r, left) for r in plan_ranges(manifest, bases)]
        deltas: list[Item] = []
        if any(has_deltas(f) for f in entries):
            views = [delta_view(f) or f.with_chunks(()) for f in entries]
            planned = plan_ranges(manifest, views)
            if self.hold is not None and heldmod.held_bytes(planned) <= heldmod.HOLD_BYTES:
                left.held = Held()
                for r in planned:
                    key, frames = self.hold(views, r)
                    for fr, stored in frames:
                        left.held.add(fr, stored, key)
            else:
                deltas = [(views, r, left) for r in planned]
        for _files, rng, _ in whole + deltas:
            for i in rng.files():
                left[i] += 1
        left.bases_left = len(whole) if deltas or left.held is not None else 0
        with self.lock:
            for i, n in enumerate(left):
                if n == 0:
                    self.on_complete(entries[i])
        return whole, deltas, left

    def planned(self, manifest: Manifest) -> Iterator[Item]:
        """(the batch's files as the range sees them, one ranged read, the batch) for every range of the
        backup: a batch's page deltas once its whole blocks are written, the next batch's whole blocks
        meanwhile. A batch holding its deltas is planned (its deltas fetched) only once the one two
        batches before it is written: at most two batches hold theirs at once, whatever the number
        of ranges in flight. Stops early when a range of whole blocks failed (the consumer raises
        its error)."""
        waiting: list[Item] = []  # the previous batch's deltas
        holding: list[Batch] = []  # the last two batches, when they hold their deltas
        for pairs in view_batches(manifest):
            if len(holding) == 2:
                if holding[0].held is not None and not self._bases_written(holding[0]):
                    return
                holding.pop(0)
            whole, deltas, batch = self._plan(manifest, pairs)
            holding.append(batch)
            yield from whole
            if waiting and not self._bases_written(waiting[0][2]):
                return
            yield from waiting
            waiting = deltas
        if waiting and self._bases_written(waiting[0][2]):
            yield from waiting

    def _bases_written(self, left: Batch) -> bool:
        """Wait until the batch's whole-block ranges are all written (True) or one failed (False)."""
        with self.cond:
            self.cond.wait_for(lambda: left.bases_left == 0 or left.failed)
            return not left.failed

    def written(self, files: list[FileEntry], rng: Range, left: Batch) -> None:
        """The range is written: every file it completes goes to ``on_complete``."""
        with self.cond:
            for i in rng.files():
                left[i] -= 1
                if left[i] == 0:
                    self.on_complete(files[i])
            if left.bases_left and not rng.deltas:
                left.bases_left -= 1
                if left.bases_left == 0:
                    self.cond.notify_all()

    def failed(self, left: Batch) -> None:
        """A range of the batch could not be written (its error goes to the consumer)."""
        with self.cond:
            left.failed = True
            self.cond.notify_all()
