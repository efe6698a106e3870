"""`dbops verify` checks a batch's whole blocks, then its page deltas with the pages of their bases
kept from that first read (dbops.repo.verify.KEEP_BYTES), fetching a base again only past that
budget: the same verdicts either way, damage named by object."""

from __future__ import annotations

import pytest

from dbops.repo import bases, ranges, verify
from dbops.repo.restore import verify_backup
from test_page_deltas import REL, _corrupt, build_chain, refs


@pytest.fixture
def fetches(monkeypatch) -> list[int]:
    """How many bases each BaseReader.fetch call (a second read of a base) asked for."""
    calls: list[int] = []
    real = bases.BaseReader.fetch

    def counted(self, refs_):
        calls.append(len(refs_))
        return real(self, refs_)

    monkeypatch.setattr(bases.BaseReader, "fetch", counted)
    return calls


@pytest.mark.parametrize("batch_blocks", [ranges.BATCH_BLOCKS, 1])
def test_deltas_are_checked_with_bases_kept_from_the_whole_block_pass(tmp_path, monkeypatch, fetches, batch_blocks):
    store, layout, f, (m1, m2, m3), copies = build_chain(tmp_path)
    monkeypatch.setattr(ranges, "BATCH_BLOCKS", batch_blocks)  # 1: a batch a file, kept pages dropped between
    assert sum(1 for c in refs(m3) if c.mask) >= 3
    rep = verify_backup(store, layout, m3, parallel=2)
    assert rep.ok and fetches == []  # no base read twice
    monkeypatch.setattr(verify, "KEEP_BYTES", 0)  # nothing kept: every base fetched again, same verdict
    assert verify_backup(store, layout, m3, parallel=2).ok
    assert sum(fetches) == sum(1 for c in refs(m3) if c.mask and c.on_base)


@pytest.mark.parametrize("keep", ["kept", "fetched again"])
@pytest.mark.parametrize("which", ["delta", "base"])
def test_a_damaged_delta_or_base_is_named_once_with_or_without_kept_bases(tmp_path, monkeypatch, keep, which):
    store, layout, f, (m1, m2, m3), copies = build_chain(tmp_path)
    if keep == "fetched again":
        monkeypatch.setattr(verify, "KEEP_BYTES", 0)
    c = refs(m3)[2]  # a delta (on a delta: the masks' union) on a base of b1
    assert c.mask and c.on_base
    r = c if which == "delta" else c.base
    key = layout.pack(r.pack)
    _corrupt(store, key, r.offset + r.length // 2)
    rep = verify_backup(store, layout, m3, parallel=2)
    assert [p.key for p in rep.problems] == [key] and REL in rep.problems[0].files
