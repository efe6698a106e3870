"""PostgreSQL: binaries, connections, control data, WAL/LSN/timeline math."""
