#!/bin/sh
# /docker-entrypoint-initdb.d hook (runs once, when the official image initialises PGDATA):
# allow replication connections (pg_basebackup, standbys) with a password from any address.
# The image's own rule, `host all all all scram-sha-256`, does not cover replication.
set -eu
echo "host replication all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
