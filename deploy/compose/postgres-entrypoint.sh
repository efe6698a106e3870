#!/bin/sh
# Entrypoint of the dbops-postgres image (deploy/Dockerfile.postgres), run as root.
#
# 1. Writes ~postgres/.pgpass from POSTGRES_PASSWORD, so that a standby's walreceiver and the
#    tools below authenticate without a password in primary_conninfo or on a command line.
# 2. With CLONE_FROM_HOST set and no cluster in PGDATA yet (a replica's first start): waits for
#    that server, then `pg_basebackup -R` from it (WAL streamed, standby.signal and
#    primary_conninfo written, replication slot REPLICATION_SLOT created when missing).
# 3. Makes an existing cluster's postgresql.conf include /etc/postgresql/dbops.conf (new
#    clusters get it from the initdb hook), so the settings come from a file, not `-c`.
# 4. Hands over to the official entrypoint, which starts PostgreSQL as user postgres.
set -eu

: "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set}"
: "${PGDATA:=/var/lib/postgresql/data}"

pgpass=/var/lib/postgresql/.pgpass
export PGPASSFILE="$pgpass"   # for the tools below and, through the server, its walreceiver
umask 077
# Escape backslashes and colons (the .pgpass field separator); the value travels on stdin only.
printf '%s' "$POSTGRES_PASSWORD" | sed 's/[\\:]/\\&/g; s/^/*:*:*:postgres:/' > "$pgpass"
echo >> "$pgpass"
chown postgres:postgres "$pgpass"
umask 022

if [ -n "${CLONE_FROM_HOST:-}" ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
    port="${CLONE_FROM_PORT:-5432}"
    slot="${REPLICATION_SLOT:?REPLICATION_SLOT must be set with CLONE_FROM_HOST}"
    install -d -o postgres -g postgres -m 0700 "$PGDATA"
    until gosu postgres pg_isready -q -h "$CLONE_FROM_HOST" -p "$port" -U postgres; do
        echo "waiting for $CLONE_FROM_HOST:$port" >&2
        sleep 1
    done
    exists=$(gosu postgres psql -X -w -h "$CLONE_FROM_HOST" -p "$port" -U postgres -d postgres -tAc \
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '$slot'")
    create=--create-slot
    [ "$exists" = 0 ] || create=
    echo "cloning $CLONE_FROM_HOST:$port into $PGDATA (slot $slot)" >&2
    gosu postgres pg_basebackup -w -h "$CLONE_FROM_HOST" -p "$port" -U postgres -D "$PGDATA" \
        -X stream -R $create -S "$slot" --checkpoint=fast
fi

if [ -s "$PGDATA/PG_VERSION" ]; then
    gosu postgres /usr/local/bin/dbops-include-conf.sh
fi

exec docker-entrypoint.sh "$@"
