#!/usr/bin/env bash
# `make demo`: a local lab (S3 + primary + replica), then dbops end to end, with a short summary.
set -euo pipefail
LAB=${LAB:-.lab}
BIN=${BIN:-.venv/bin}
DBOPS="$BIN/dbops"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
summary=()
note() { summary+=("$*"); }
t0=$(date +%s.%N)
elapsed() { python3 -c "import time; print(f'{time.time()-$1:.1f}s')"; }

step "lab: SeaweedFS S3, PostgreSQL 15 primary + streaming replica on loopback"
"$DBOPS" lab up --dir "$LAB"
eval "$("$DBOPS" lab env --dir "$LAB")"
note "lab up in $LAB ($(elapsed "$t0"))"

step "dbops check"
"$DBOPS" check
note "dbops check: green"

step "summary"
for line in "${summary[@]}"; do echo "  - $line"; done
echo
echo "The lab keeps running; use it with:  eval \"\$($DBOPS lab env --dir $LAB)\""
echo "Stop it with:  make lab-down   (or: $DBOPS lab down --dir $LAB --purge)"
