"""RelFiles: the checks' verified main forks, held compactly, answer as a set of their paths would."""

from __future__ import annotations

import random

from dbops.ops.backup.relfiles import RelFiles


def test_answers_as_a_set_of_paths():
    rnd = random.Random(7)
    folders = ["base/1", "base/16384", "pg_tblspc/16400/PG_15_202209061/16384", "global"]
    added = [f"{rnd.choice(folders)}/{rnd.randrange(1, 2 ** 32)}" for _ in range(3000)]
    added += added[:50] + ["base/5/not_a_number", "base/5/99999999999", "base/5/", "odd"]
    files, want = RelFiles(), set()
    for i, p in enumerate(added):  # asked while still being filled, as well as after
        files.add(p)
        want.add(p)
        if i % 500 == 0:
            assert p in files and f"{p}1" not in files
    probes = added + [f"{f}/{rnd.randrange(1, 2 ** 32)}" for f in folders for _ in range(500)]
    probes += ["base/16384/16384_fsm", "base/16384/16384.1", "elsewhere/1", "", 12]
    assert [p in files for p in probes] == [p in want for p in probes]
    assert len(files) == len(want) and bool(files) and not RelFiles()
