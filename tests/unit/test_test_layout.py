"""The suite's own layout: pytest imports test files by basename (rootdir-relative, no packages), so two
test files with one name in different folders stop the whole suite from being collected."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def test_every_test_file_has_its_own_basename():
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert [n for n, c in names.items() if c > 1] == []
