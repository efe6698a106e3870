#!/bin/sh
# Makes postgresql.conf in PGDATA include /etc/postgresql/dbops.conf (deploy/postgresql/dbops.conf,
# mounted by docker-compose.yml), once. Run by the dbops-postgres image: as an initdb hook
# (/docker-entrypoint-initdb.d, a new cluster) and from its entrypoint on every start (a cluster
# created before, or cloned). `include`, not include_if_exists: a missing file stops the server
# instead of silently running without archiving. postgresql.auto.conf (ALTER SYSTEM) is read
# after postgresql.conf and its includes, so ALTER SYSTEM keeps working.
: "${PGDATA:=/var/lib/postgresql/data}"
conf="$PGDATA/postgresql.conf"
line="include = '/etc/postgresql/dbops.conf'"
# No `exit`: the official entrypoint sources hooks that are not executable.
if [ -f "$conf" ] && ! grep -qxF "$line" "$conf"; then
    printf '\n# dbops (deploy/postgresql/dbops.conf)\n%s\n' "$line" >> "$conf"
fi
