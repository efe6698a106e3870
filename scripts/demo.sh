#!/usr/bin/env bash
# `make demo`: a local lab (S3 + primary + replica), then dbops end to end with a short summary:
# check, a validated backup chain, an accident and a point-in-time restore, a planned failover
# and back, backups carrying on across the timeline switch, automatic retention, and
# `dbops status` with the RPO and RTO.
set -euo pipefail
LAB=${LAB:-.lab}
BIN=${BIN:-.venv/bin}
DBOPS="$(cd "$(dirname "$BIN/dbops")" && pwd)/dbops"
PGBIN=$("$BIN/python" -c 'from dbops.pg import binaries; print(binaries.bindir())')

bold() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
summary=()
note() { summary+=("$*"); }
now() { date +%s.%N; }
since() { "$BIN/python" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}s')" "$1" "$(now)"; }
sql() { PGOPTIONS="-c client_min_messages=warning" "$PGBIN/psql" -XAtq -v ON_ERROR_STOP=1 -c "$1"; }

bold "lab: SeaweedFS S3, PostgreSQL 15 primary + streaming replica on loopback"
t=$(now)
"$DBOPS" lab up --dir "$LAB"
eval "$("$DBOPS" lab env --dir "$LAB")"
LAB_ABS=$(cd "$LAB" && pwd)
# The lab keeps 7 backups and prunes automatically (backup.retention.auto); the demo keeps 2, so
# its third backup shows retention at work.
sed -i 's/^    keep_last: 7$/    keep_last: 2/' "$LAB_ABS/dbops.yaml"
note "lab up in $LAB ($(since "$t")); retention: keep_last 2, auto (prune after each backup)"

bold "dbops check"
"$DBOPS" check
note "dbops check: green (nodes, archiving, storage probe, throwaway container)"

bold "some data, and the first backup (taken, started in a throwaway container, stored)"
sql "CREATE TABLE IF NOT EXISTS orders (id int PRIMARY KEY, item text, created timestamptz DEFAULT now())"
sql "INSERT INTO orders SELECT g, 'order ' || g FROM generate_series(1, 1000) g ON CONFLICT DO NOTHING"
t=$(now)
"$DBOPS" -v backup 2>/dev/null
note "backup 1 (full) stored in $(since "$t")"

bold "more writes, then the second backup: it restores backup 1, starts and replays it, then stores only changes"
"$PGBIN/pgbench" -i -s 2 -q postgres >/dev/null 2>&1
"$PGBIN/pgbench" -n -c 2 -T 5 postgres >/dev/null 2>&1
t=$(now)
"$DBOPS" -v backup 2>/dev/null
note "backup 2 stored in $(since "$t"), and backup 1 validated by it"
"$DBOPS" backup list

bold "an accident: DELETE without WHERE at a known time"
BEFORE=$("$BIN/python" -c 'from datetime import datetime, timezone; print(datetime.now(timezone.utc).isoformat())')
sleep 1
HAD=$(sql "SELECT count(*) FROM orders")  # 1000 on a new lab; a lab reused from an earlier demo has that one's too
sql "DELETE FROM orders"
# Archive the segment holding the DELETE now (in production, archive_timeout bounds this wait).
SWITCHED=$(sql "SELECT pg_walfile_name(pg_switch_wal())")
for _ in $(seq 600); do
  [[ "$(sql 'SELECT coalesce(last_archived_wal, 0::text) FROM pg_stat_archiver')" < "$SWITCHED" ]] || break
  sleep 0.1
done
echo "orders after the accident: $(sql 'SELECT count(*) FROM orders')"

bold "restore to just before it: dry run first, then for real, started on a spare port"
"$DBOPS" restore --to "$BEFORE" --target-dir "$LAB_ABS/restore" --force --dry-run
PORT=$("$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
t=$(now)
"$DBOPS" restore --to "$BEFORE" --target-dir "$LAB_ABS/restore" --force --start --port "$PORT"
ROWS=$("$PGBIN/psql" -XAtq -h 127.0.0.1 -p "$PORT" -c "SELECT count(*) FROM orders")
echo "orders in the restored copy: $ROWS"
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$LAB_ABS/restore" -m fast -w stop >/dev/null
test "$ROWS" = "$HAD"
note "point-in-time restore to just before the DELETE in $(since "$t"): all $HAD orders back"

bold "planned failover to the replica (pg2), writes on the new timeline, and a backup across the switch"
t=$(now)
"$DBOPS" failover --to pg2 --yes
note "failover to pg2 in $(since "$t")"
eval "$("$DBOPS" lab env --dir "$LAB")"
export PGPORT=$("$BIN/python" -c "
from dbops import config
from dbops.pg import conn
cfg = config.load('$LAB_ABS/dbops.yaml')
for n in cfg.nodes:
    with conn.session(n) as c:
        if not conn.scalar(c, 'SELECT pg_is_in_recovery()'):
            print(n.port)")
sql "INSERT INTO orders SELECT g, 'after failover ' || g FROM generate_series(1001, 1100) g"
t=$(now)
out=$("$DBOPS" -v backup 2>/dev/null)
echo "$out"
note "backup 3 validated backup 2 across the timeline switch ($(since "$t"))"
note "automatic $(grep '^retention:' <<<"$out")"

bold "failover back to pg1"
t=$(now)
"$DBOPS" failover --to pg1 --yes
note "failover back to pg1 in $(since "$t")"

bold "status: topology, backups, archive, RPO (what a loss now would lose) and RTO (the newest measured restore)"
"$DBOPS" status
"$DBOPS" backup list
"$DBOPS" status --json > "$LAB_ABS/status.json"
rpo_rto=$("$BIN/python" - "$LAB_ABS/status.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
rpo, rto = d["rpo"], d["rto"]
print(f"RPO {rpo['bytes']} bytes / {rpo['seconds']} s not archived; "
      f"RTO {rto['seconds']} s, measured restoring {rto['backup_id']}")
PY
)
note "dbops status: $rpo_rto"

bold "summary"
for line in "${summary[@]}"; do echo "  - $line"; done
echo
echo "The lab keeps running; use it with:  eval \"\$($DBOPS lab env --dir $LAB)\""
echo "Stop it with:  make lab-down   (or: $DBOPS lab down --dir $LAB --purge)"
