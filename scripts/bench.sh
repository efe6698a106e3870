#!/usr/bin/env bash
# `make bench`: benchmarks on a fresh lab; JSON lines on stdout. BENCH_SCALE (default 100) sets the pgbench scale.
set -euo pipefail
BIN=${BIN:-.venv/bin}
exec "$BIN/python" bench/run.py "$@"
