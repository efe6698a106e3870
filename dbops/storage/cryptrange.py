"""Ranged reads of encrypted objects as streams (see dbops.storage.crypt for the format): the
sealed segments covering a range are read ``BATCH`` at a time and each is opened, its tag
checked, before any of its plaintext is handed out."""

from __future__ import annotations

from typing import Protocol

from dbops.storage.base import RangeReader
from dbops.storage.cryptformat import BATCH, SEGMENT, STEP


class Opened(Protocol):
    def segment_into(self, i: int, ct: bytes | memoryview, out: bytearray | memoryview, key: str, *,
                     last: bool | None) -> int:
        ...


class OpenedRange:
    """The plaintext of a ranged read of an encrypted object, opened segment by segment as the
    ciphertext arrives. A segment's "last" flag is known from what follows it: a short segment is
    the object's last, a full one followed by more is not, a full one at the end of the range may
    be (as in get_range)."""

    def __init__(self, o: Opened, key: str, src: RangeReader, first: int, skip: int, length: int):
        self.o, self.key, self.src = o, key, src
        self.i = first  # the next segment to open
        self.carry = b""  # a full segment read but not opened yet (is it the last?)
        self.eof = False
        self.plain, self.at = memoryview(b""), 0  # opened plaintext not handed out yet
        self.skip, self.left = skip, length

    def _refill(self) -> bool:
        if self.eof and not self.carry:
            return False
        more = b"" if self.eof else self.src.read(BATCH * STEP)
        self.eof = self.eof or len(more) < BATCH * STEP
        ct = memoryview(self.carry + more if self.carry else more)
        n = -(-len(ct) // STEP)
        keep = 0 if self.eof or n == 0 else 1  # hold back the last full segment until more arrives
        out = bytearray((n - keep) * SEGMENT)
        om, w = memoryview(out), 0
        for j in range(n - keep):
            piece = ct[j * STEP:(j + 1) * STEP]
            last = True if len(piece) < STEP else (False if len(ct) > (j + 1) * STEP else None)
            w += self.o.segment_into(self.i, piece, om[w:], self.key, last=last)
            self.i += 1
        self.carry = bytes(ct[(n - keep) * STEP:]) if keep else b""
        self.plain, self.at = om[:w], 0
        if self.skip:
            cut = min(self.skip, w)
            self.at, self.skip = cut, self.skip - cut
        return True

    def read(self, n: int) -> bytes:
        n = min(n, self.left)
        parts: list[bytes] = []
        got = 0
        while got < n:
            if self.at >= len(self.plain) and not self._refill():
                break
            take = bytes(self.plain[self.at:self.at + n - got])
            self.at += len(take)
            got += len(take)
            parts.append(take)
        self.left -= got
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        self.src.close()

    def __enter__(self) -> OpenedRange:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
