"""Page delta frames (format 5): written with the base's pages as a zstd prefix, read with them as a
raw-content dictionary (and the other way round), byte for byte, whatever wrote them; read through
zstd's own functions on a context kept per thread (zstandard's cffi backend) and, where that is
not installed, through a decompressor made for each delta: the same bytes and faults either way.
Written likewise through zstd's own functions on a compression context kept per thread, or through
the prefix module's compressor made for each delta: byte-identical frames."""

from __future__ import annotations

import random

import pytest
import zstandard

from dbops.repo import blocks, codec
from dbops.repo.codec import prefix_zstd
from dbops.repo.frames import open_delta
from dbops.repo.model import ChunkRef
from labkit import same_zstd

PAGE = 8192
stdzstd = prefix_zstd()


def one_way(request, monkeypatch, functions: str) -> str:
    """The first param: zstd's own functions (codec.<functions>(), installed with zstandard here,
    pyproject.toml); the second: without them (the fallback)."""
    if request.param.startswith(("context", "compression context")):
        assert getattr(codec, functions)() is not None
    else:
        monkeypatch.setattr(codec, functions, lambda: None)
    return request.param


@pytest.fixture(params=["context per thread", "decompressor per delta"], autouse=True)
def reader(request, monkeypatch):
    """Every test here runs with both ways of reading a delta (:meth:`codec.Decoder.decode_on`)."""
    return one_way(request, monkeypatch, "zstd_functions")


@pytest.fixture(params=["compression context per thread", "compressor per delta"], autouse=True)
def writer_path(request, monkeypatch):
    """Every test here runs with both ways of writing a delta (:meth:`codec.Encoder.encode_on`)."""
    return one_way(request, monkeypatch, "zstd_compress_functions")


def prefix_frame(payload: bytes, base: bytes, level: int) -> bytes:
    """A delta frame as the prefix module writes it (the fallback writer's own calls)."""
    c = stdzstd.ZstdCompressor(level=level, zstd_dict=stdzstd.ZstdDict(base, is_raw=True).as_prefix)
    return c.compress(payload, stdzstd.ZstdCompressor.FLUSH_FRAME)


def heap_page(rng: random.Random, lsn: int) -> bytearray:
    """A page shaped like a pgbench_accounts page: header, line pointers, 97-byte tuples."""
    p = bytearray(PAGE)
    p[0:8] = lsn.to_bytes(8, "little")
    at = PAGE
    for n in range(60):
        at -= 97
        p[at:at + 97] = rng.randbytes(12) + (n * 1000 + rng.randrange(1000)).to_bytes(4, "little") + b" " * 81
        p[24 + 4 * n:28 + 4 * n] = at.to_bytes(4, "little")
    return p


def updated(rng: random.Random, page: bytearray, lsn: int) -> bytes:
    """The page after a few HOT updates: a new LSN, changed tuple headers and balances."""
    p = bytearray(page)
    p[0:8] = lsn.to_bytes(8, "little")
    for _ in range(3):
        at = PAGE - 97 * (1 + rng.randrange(60))
        p[at:at + 8] = rng.randbytes(8)
        p[at + 12:at + 16] = rng.randbytes(4)
    return bytes(p)


def deltas(seed: int = 7) -> list[tuple[bytes, bytes, int]]:
    """(payload, its base's same pages, mask) for deltas of 1 to 8 changed pages of 8-page blocks."""
    rng = random.Random(seed)
    out = []
    for n in range(1, 9):
        base = b"".join(heap_page(rng, 0x1000 + i) for i in range(8))
        mask = sum(1 << p for p in rng.sample(range(8), n))
        new = b"".join(updated(rng, bytearray(base[p * PAGE:(p + 1) * PAGE]), 0x9000) if mask >> p & 1
                       else base[p * PAGE:(p + 1) * PAGE] for p in range(8))
        out.append((blocks.same_pages(new, mask), blocks.same_pages(base, mask), mask))
    return out


def digested_dictionary_frame(payload: bytes, dictionary: bytes) -> bytes:
    """A delta frame as dbops wrote them before the prefix: a digested raw-content dictionary, level 6."""
    d = zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdCompressor(level=6, dict_data=d, write_content_size=True, write_dict_id=False).compress(payload)


def prefix_decoded(stored: bytes, dictionary: bytes) -> bytes:
    return stdzstd.ZstdDecompressor(zstd_dict=stdzstd.ZstdDict(dictionary, is_raw=True).as_prefix).decompress(stored)


@pytest.mark.parametrize("writer", ["prefix", "digested dictionary"])
def test_delta_frames_decode_with_a_dictionary_or_a_prefix_byte_for_byte(writer):
    enc, dec = codec.Encoder("zstd", 3), codec.Decoder()
    for payload, dictionary, mask in deltas():
        stored = enc.encode_on(payload, dictionary) if writer == "prefix" else digested_dictionary_frame(payload, dictionary)
        assert len(stored) < len(payload) // 20  # the base made it small
        assert dec.decode_on(stored, len(payload), dictionary) == payload
        assert prefix_decoded(stored, dictionary) == payload
        # the restore's reader: a format 5 ref, the base block whole
        base = bytearray(8 * PAGE)
        for k, p in enumerate(blocks.pages_of(mask)):
            base[p * PAGE:(p + 1) * PAGE] = dictionary[k * PAGE:(k + 1) * PAGE]
        ref = ChunkRef(codec.sha256(payload), "p", 0, len(stored), 8 * PAGE, 0, len(payload), mask,
                       ChunkRef("00" * 16, "q", 0, 10, 8 * PAGE, 0, 8 * PAGE), True)
        raw, why = open_delta(dec, ref, stored, bytes(base))
        assert raw is not None and bytes(raw) == payload and not why


def test_a_prefix_frame_read_with_a_wrong_base_does_not_give_the_pages():
    enc, dec = codec.Encoder("zstd", 3), codec.Decoder()
    (payload, dictionary, _), (_, other, _) = deltas()[:2]
    stored = enc.encode_on(payload, dictionary)
    try:
        got = dec.decode_on(stored, len(payload), other[:len(dictionary)])
    except zstandard.ZstdError:
        return
    assert got != payload  # wrong bytes: the caller's sha256 check of the pages catches them


def test_a_damaged_or_cut_delta_frame_fails_to_decode_or_gives_other_bytes():
    """A flipped byte or a frame cut short (as a damaged object gives them) never gives the pages:
    zstd refuses it, or the bytes differ (the caller's sha256 check of the pages refuses those)."""
    enc, dec = codec.Encoder("zstd", 3), codec.Decoder()
    for payload, dictionary, mask in deltas(seed=11):
        stored = enc.encode_on(payload, dictionary)
        for bad in (stored[:len(stored) // 2], stored[:-1], stored[:len(stored) // 2] + bytes([stored[len(stored) // 2] ^ 0x40])
                    + stored[len(stored) // 2 + 1:]):
            try:
                got = dec.decode_on(bad, len(payload), dictionary)
            except zstandard.ZstdError:
                continue
            assert bytes(got) != payload
        ref = ChunkRef(codec.sha256(payload), "p", 0, len(stored), 8 * PAGE, 0, len(payload), mask,
                       ChunkRef("00" * 16, "q", 0, 10, 8 * PAGE, 0, 8 * PAGE), True)
        raw, why = open_delta(dec, ref, stored[:-1], bytes(8 * PAGE))  # short: named as such, not decoded
        assert raw is None and "too short" in why


@pytest.mark.parametrize("level,used", [(-5, codec.DELTA_LEVEL), (1, codec.DELTA_LEVEL), (2, codec.DELTA_LEVEL), (9, 9)])
def test_deltas_are_compressed_at_the_delta_level_at_least(level, used):
    """Configured levels under DELTA_LEVEL are raised to it for deltas (level 2 measured up to 10x
    larger on pgbench deltas of 4 pages or more); a higher configured level is kept: the frame is
    the prefix module's at that level, byte for byte, whichever way it was written."""
    enc = codec.Encoder("zstd", level)
    for payload, dictionary, _ in deltas():
        stored = enc.encode_on(payload, dictionary)
        if same_zstd():
            assert stored == prefix_frame(payload, dictionary, used)
        assert codec.Decoder().decode_on(stored, len(payload), dictionary) == payload


def test_both_writers_give_frames_that_decode_and_the_same_bytes_with_one_zstd(monkeypatch):
    """The context kept per thread and the compressor made for each delta write identical bytes:
    deltas of 1 to 8 pages, many in a row on one context (its prefix used for one frame only),
    memoryview bases and payloads, a payload zstd cannot shrink (stored raw), from several threads."""
    import concurrent.futures

    rng = random.Random(5)
    cases = [(p, d) for seed in (1, 2, 3) for p, d, _ in deltas(seed)]
    cases.append((rng.randbytes(2 * PAGE), rng.randbytes(2 * PAGE)))  # incompressible: stored raw
    cases.append((cases[0][0], cases[1][1][:len(cases[0][0])]))  # a wrong base still compresses alike
    magic = bytearray(cases[2][1])
    magic[0:4] = bytes.fromhex("37a430ec")  # zstd's dictionary magic: still raw content (a prefix)
    cases.append((cases[2][0], bytes(magic)))
    fast = codec.Encoder("zstd", 3)

    def written(enc):
        return [enc.encode_on(memoryview(p), memoryview(bytearray(d))) for p, d in cases]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        many = list(pool.map(lambda _: written(fast), range(8)))
    monkeypatch.setattr(codec, "zstd_compress_functions", lambda: None)
    slow = written(codec.Encoder("zstd", 3))
    dec = codec.Decoder()
    assert all(dec.decode_on(w, len(p), d) == p for ws in many + [slow] for w, (p, d) in zip(ws, cases))
    assert slow[-3] == cases[-3][0]  # raw
    if same_zstd():  # the same zstd release in both: the same bytes
        assert all(m == slow for m in many)
        assert slow == [prefix_frame(p, d, 3) if len(prefix_frame(p, d, 3)) < len(p) else p for p, d in cases]


def test_a_base_starting_with_zstds_dictionary_magic_is_read_as_raw_content():
    """A base whose first bytes are zstd's dictionary magic (37 A4 30 EC) is still the delta's raw
    prefix, never parsed as a structured dictionary (which zstd would refuse as corrupted)."""
    rng = random.Random(11)
    base = bytearray(heap_page(rng, 0x2000))
    base[0:4] = bytes.fromhex("37a430ec")
    raw = bytearray(base)
    raw[PAGE - 200:PAGE - 100] = rng.randbytes(100)
    stored = codec.Encoder().encode_on(bytes(raw), bytes(base))
    assert len(stored) < PAGE  # compressed against the base, not kept raw
    d = codec.Decoder()
    assert bytes(d.decode_on(stored, PAGE, bytes(base))) == bytes(raw)
    assert bytes(d.decode_on(stored, PAGE, bytes(base))) == bytes(raw)  # the prefix is used again, per call
