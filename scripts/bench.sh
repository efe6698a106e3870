#!/usr/bin/env bash
# `make bench`: benchmarks on a fresh lab; JSON lines on stdout. BENCH_SCALE (default 100) sets the pgbench scale;
# BENCH_SCALES (default "100 400") the scale sweep (bench/bench_scale.py), a fresh lab per scale.
set -euo pipefail
BIN=${BIN:-.venv/bin}
exec "$BIN/python" bench/run.py "$@"
