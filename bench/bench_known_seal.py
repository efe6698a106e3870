"""Time and memory of sealing the record of unchanged files (dbops.repo.known) for many files.

    python bench/bench_known_seal.py 1e5 1e6 3e6        (under benchlock: one child process a size)

Each size runs in a child process of its own: a Known filled with that many rows (random path
hashes, made-up identities: no file is created or stat'ed), then sealed on a temporary folder.
One JSON line a size: the seal's wall and CPU seconds, the arrays' bytes once sealed, and the
child's peak RSS before the seal (the rows, in arrays) and after it (``seal_extra``: what the seal
added at its peak). Runs with the dbops that imports: the same script on another checkout's venv
measures that checkout (an older Known kept the hashes as its first column).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from array import array


def child(n: int) -> dict:
    from dbops.repo.known import Known

    k = Known()
    hashes = array("Q", os.urandom(8 * n))
    ident = [array(c.typecode, range(n)) for c in (k.cols[-5:])]
    if hasattr(k, "hashes"):
        k.hashes, k.cols = hashes, tuple(ident)
    else:  # the hashes as the first column
        k.cols = (hashes, *ident)
    del hashes, ident
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory(prefix="dbops-seal-") as d:
        t, c = time.perf_counter(), time.process_time()
        k.seal(d)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        assert len(k) == n and k.usable()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    arrays = [*k.cols, k.sorted, *([k.order] if hasattr(k, "order") else [])]
    return {"files": n, "seal_s": round(wall, 3), "seal_cpu_s": round(cpu, 3),
            "sealed_mib": round(sum(a.itemsize * len(a) for a in arrays) / 2**20, 1),
            "rows_peak_mib": round(before / 1024, 1), "seal_extra_mib": round((after - before) / 1024, 1),
            "peak_mib": round(after / 1024, 1)}


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        print(json.dumps(child(int(float(argv[1])))))
        return
    for size in argv or ["1e5", "1e6", "3e6"]:
        out = subprocess.run([sys.executable, __file__, "--child", size], check=True, capture_output=True, text=True)
        print(out.stdout.strip(), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
