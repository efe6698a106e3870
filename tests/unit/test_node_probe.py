"""One probe of a node (pg/inspect): what check makes of it, and that topology and wal status share it."""

from __future__ import annotations

from dbops.config import Node
from dbops.ops import check, topology
from dbops.pg import inspect
from dbops.pg.lsn import parse_lsn

PG1, PG2 = Node(name="pg1", host="127.0.0.1", port=5432), Node(name="pg2", host="127.0.0.1", port=5433)
SETTINGS = {"data_checksums": "off", "wal_log_hints": "on", "archive_mode": "on", "wal_level": "replica",
            "archive_command": "dbops -c /etc/dbops.yaml wal-push %p"}


def test_check_reads_a_primary_and_a_standby_from_the_probe():
    primary = inspect.NodeState(
        node=PG1, role=inspect.PRIMARY, version="15.8", version_num=150008, system_identifier="7", timeline=2,
        current_lsn=parse_lsn("0/5000100"), current_wal="000000020000000000000005", settings=SETTINGS,
        senders=(inspect.Sender("pg2", "127.0.0.1", "streaming", None, None, parse_lsn("0/5000000"), "async"),),
        archiver=inspect.Archiver(4, "000000020000000000000004", 0.0, 1, "000000020000000000000003", 1.5, 0))
    rep = check.node_report(primary)
    assert rep.reachable and rep.role == "primary" and rep.version == "15.8" and rep.timeline == 2
    assert rep.archive_uses_dbops and rep.wal_log_hints and not rep.data_checksums and rep.wal_level == "replica"
    assert rep.replication == [{"application_name": "pg2", "client_addr": "127.0.0.1", "state": "streaming",
                                "sync_state": "async", "replay_lag_bytes": 0x100}]
    assert rep.archiver["failing"] and rep.archiver["last_failed_time"] == "1970-01-01T00:00:01.500000+00:00"
    assert rep.archiver["last_archived_time"] is None  # never
    standby = inspect.NodeState(
        node=PG2, role=inspect.STANDBY, version="15.8", version_num=150008, system_identifier="7", timeline=2,
        receive_lsn=parse_lsn("0/5000100"), replay_lsn=parse_lsn("0/5000000"), replay_paused=True, settings=SETTINGS,
        receiver=inspect.Receiver("streaming", 2, parse_lsn("0/5000100"), "127.0.0.1", 5432, None), upstream="pg1")
    rep = check.node_report(standby)
    assert rep.role == "standby" and rep.replay_paused and rep.replay_lag_bytes == 0x100
    assert rep.receiver == {"status": "streaming", "sender_host": "127.0.0.1", "sender_port": 5432, "received_tli": 2}
    down = check.node_report(inspect.NodeState(node=PG2, role=inspect.UNREACHABLE, error="connection refused"))
    assert not down.reachable and down.role is None


def test_topology_is_built_on_the_same_probe():
    assert topology.probe is inspect.probe and topology.NodeState is inspect.NodeState
    assert inspect.upstream_name(inspect.Receiver("streaming", 1, None, "127.0.0.1", 5433, None), (PG1, PG2)) == "pg2"
