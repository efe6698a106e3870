"""`failover --primary-lost` and `rejoin` building blocks without a server: which node was the
primary, the candidate, the findings, the loss figures, pg_waldump parsing, the CLI's usage errors."""

from __future__ import annotations

from dataclasses import replace

import pytest

from dbops import config as cfgmod
from dbops.errors import EXIT_CODE_DOC, ExitCode
from dbops.ops.failover import assess as fa
from dbops.ops.failover import loss as floss
from dbops.ops.failover.emergency import restore_command_for
from dbops.ops.topology import NodeState, Receiver, Topology
from dbops.pg import waldump
from dbops.pg.lsn import parse_lsn

SETTINGS = {"data_checksums": "on", "wal_log_hints": "on", "archive_mode": "on",
            "archive_command": "/venv/bin/dbops -c /etc/dbops.yaml wal-push %p", "primary_slot_name": "slot_x",
            "max_wal_senders": "10", "max_replication_slots": "10"}


def _cfg(**failover):
    raw = {"cluster": "c", "storage": {"bucket": "bkt"},
           "nodes": [{"name": n, "port": p, "data_dir": f"/d/{n}"} for n, p in (("pg1", 5432), ("pg2", 5433),
                                                                                ("pg3", 5434))]}
    if failover:
        raw["failover"] = failover
    return cfgmod.parse(raw, env={})


def _lost_topology(cfg, *, recv2="0/5000100", recv3="0/5000200", primary_answers=False) -> Topology:
    pg1, pg2, pg3 = cfg.nodes
    if primary_answers:
        p = NodeState(node=pg1, role="primary", system_identifier="42", timeline=1, current_lsn=parse_lsn("0/5000300"),
                      settings=dict(SETTINGS))
    else:
        p = NodeState(node=pg1, role="unreachable", error="connection refused")

    def standby(node, recv):
        return NodeState(node=node, role="standby", version_num=150000, system_identifier="42", timeline=1,
                         receive_lsn=parse_lsn(recv), replay_lsn=parse_lsn(recv) - 8, replay_paused=False,
                         settings=dict(SETTINGS), receiver=Receiver("waiting", 1, parse_lsn(recv), None, None, None),
                         upstream=None, configured_upstream=("127.0.0.1", pg1.port))

    return Topology((p, standby(pg2, recv2), standby(pg3, recv3)))


def _archive(last="0/4FFFF00", end="0/4FFFF40") -> fa.ArchiveEnd:
    return fa.ArchiveEnd(True, 1, segment="000000010000000000000004", last_record_lsn=parse_lsn(last),
                         end_lsn=parse_lsn(end))


def _reachable(cfg, st):
    return None


def _unreachable(cfg, st):
    return "cannot tell whether PostgreSQL runs"


def test_the_lost_primary_is_the_node_the_standbys_point_at_and_the_best_standby_is_chosen():
    cfg = _cfg()
    plan = fa.assess(cfg, fa.LostOptions(), topo=_lost_topology(cfg), archive=_archive(), reach=_reachable)
    assert plan.ok, plan.findings
    assert plan.old_primary.name == "pg1" and plan.candidate.name == "pg3" and [s.name for s in plan.others] == ["pg2"]
    rows = {r["name"]: r for r in plan.standby_rows()}
    assert rows["pg3"]["behind_best_bytes"] == 0 and rows["pg2"]["behind_best_bytes"] == 0x100
    steps = "\n".join(plan.steps)
    assert "stop PostgreSQL (immediate)" in steps and "promote pg3 (new timeline 2)" in steps
    assert "000000010000000000000004" in steps and "TWO PRIMARIES" not in steps


def test_a_primary_that_answers_is_refused_with_the_planned_path_named():
    cfg = _cfg()
    plan = fa.assess(cfg, fa.LostOptions(), topo=_lost_topology(cfg, primary_answers=True), archive=_archive(),
                     reach=_reachable)
    assert not plan.ok and [f.check for f in plan.blocking] == ["primary answers"]
    err = plan.refuse()
    assert err.exit_code == 11 and "dbops failover" in err.detail


def test_no_way_to_fence_is_refused_unless_no_fence_and_then_the_plan_says_two_primaries():
    cfg = _cfg()
    topo = _lost_topology(cfg)
    plan = fa.assess(cfg, fa.LostOptions(), topo=topo, archive=_archive(), reach=_unreachable)
    assert [f.check for f in plan.blocking] == ["fence"] and "--no-fence" in plan.blocking[0].fix
    plan = fa.assess(cfg, fa.LostOptions(no_fence=True), topo=topo, archive=_archive(), reach=_unreachable)
    assert plan.ok and any("TWO PRIMARIES" in s for s in plan.steps)
    hooked = _cfg(fence_hooks=["true"])
    plan = fa.assess(hooked, fa.LostOptions(), topo=topo, archive=_archive(), reach=_unreachable)
    assert plan.ok and any("fence hook" in s and "stops here" in s for s in plan.steps)


def test_to_a_less_advanced_standby_warns_and_a_later_timeline_in_the_archive_refuses():
    cfg = _cfg()
    topo = _lost_topology(cfg)
    plan = fa.assess(cfg, fa.LostOptions(to="pg2"), topo=topo, archive=_archive(), reach=_reachable)
    assert plan.ok and plan.candidate.name == "pg2"
    assert any(f.check == "candidate" and f.status == "warn" and "pg3" in f.message for f in plan.findings)
    later = replace(_archive(), later_timelines=[2])
    plan = fa.assess(cfg, fa.LostOptions(), topo=topo, archive=later, reach=_reachable)
    assert [f.check for f in plan.blocking] == ["later timeline"]
    plan = fa.assess(cfg, fa.LostOptions(to="ghost"), topo=topo, archive=_archive(), reach=_reachable)
    assert [f.check for f in plan.blocking] == ["candidate"]


def test_known_ends_include_the_archive():
    cfg = _cfg()
    plan = fa.assess(cfg, fa.LostOptions(), topo=_lost_topology(cfg, recv2="0/3000000", recv3="0/3000100"),
                     archive=_archive(), reach=_reachable)
    ends = plan.known_ends()
    assert max(ends, key=ends.get) == "archive"
    assert plan.standby_rows()[1]["behind_best_bytes"] == parse_lsn("0/4FFFF40") - parse_lsn("0/3000100")


# ----------------------------------------------------------------------------- loss figures

S = parse_lsn("0/5000200")


def test_nothing_known_lost_when_the_candidate_had_the_most():
    loss = floss.compute(switch=S, candidate="pg3", candidate_had=S + 10, ends={"pg3": S + 10, "pg2": S - 100,
                         "archive": S - 0x1000}, archive_checked=True, archive_expected=True,
                         archive_last_record=S - 0x1040)
    assert not loss.possible and loss.known_lost_bytes == 0 and loss.candidate_unreplayed_bytes == 10
    assert loss.known_end_sources == ["pg3"] and loss.archive_beyond_candidate is False


def test_archive_beyond_the_candidate_replayed_counts_as_recovered():
    had = S - 0x100000
    loss = floss.compute(switch=S, candidate="pg3", candidate_had=had, ends={"pg3": had, "archive": S - 8},
                         archive_checked=True, archive_expected=True, archive_last_record=S - 48)
    assert not loss.possible and loss.archive_beyond_candidate and loss.recovered_from_archive_bytes == 0x100000


def test_wal_on_another_standby_or_unreplayed_archive_is_a_possible_loss():
    loss = floss.compute(switch=S, candidate="pg2", candidate_had=S, ends={"pg2": S, "pg3": S + 0x200},
                         archive_checked=True, archive_expected=True, archive_last_record=None)
    assert loss.possible and loss.known_lost_bytes == 0x200 and "pg3" in loss.reasons[0]
    loss = floss.compute(switch=S, candidate="pg2", candidate_had=S, ends={"pg2": S, "archive": S + 0x80},
                         archive_checked=True, archive_expected=True, archive_last_record=S + 0x40)
    assert loss.possible and loss.known_lost_bytes == 0x80
    loss = floss.compute(switch=S, candidate="pg2", candidate_had=S, ends={"pg2": S}, archive_checked=False,
                         archive_expected=True, archive_last_record=None)
    assert loss.possible and "could not be read" in loss.reasons[0]


def test_loss_possible_has_its_own_documented_exit_code():
    assert ExitCode.LOSS_POSSIBLE == 15 and ExitCode.LOSS_POSSIBLE in EXIT_CODE_DOC
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "exit-codes.md").read_text()
    assert "| 15 | LOSS_POSSIBLE |" in doc


# ----------------------------------------------------------------------------- pg_waldump output

DUMP = """\
rmgr: Heap        len (rec/tot):     54/    54, tx:        735, lsn: 0/03000060, prev 0/03000028, desc: INSERT off 2
rmgr: Transaction len (rec/tot):     34/    34, tx:        735, lsn: 0/03000098, prev 0/03000060, desc: COMMIT 2026-11-29 20:01:02.123456 UTC
rmgr: Transaction len (rec/tot):     34/    34, tx:        736, lsn: 0/030000C0, prev 0/03000098, desc: ABORT 2026-11-29 20:01:03.5 UTC
rmgr: Standby     len (rec/tot):     50/    50, tx:          0, lsn: 0/030000E8, prev 0/030000C0, desc: RUNNING_XACTS
pg_waldump: error: error in WAL record at 0/30000E8: invalid record length at 0/3000120: wanted 24, got 0
"""


def test_waldump_parse_finds_transactions_and_where_the_wal_ends():
    d = waldump.parse(DUMP)
    assert len(d.records) == 4 and d.stop_lsn == parse_lsn("0/3000120") and d.last_valid_lsn == parse_lsn("0/30000E8")
    ends = waldump.xact_ends(d.records)
    assert [(x.kind, x.xid) for x in ends] == [("COMMIT", 735), ("ABORT", 736)]
    assert floss.iso(ends[0].time) == "2026-11-29T20:01:02.123456+00:00"
    assert waldump.last_commit(d.records).xid == 735
    assert waldump.last_commit(d.records, before=parse_lsn("0/3000098")) is None
    empty = waldump.parse("pg_waldump: error: could not find a valid record after 0/5000000\n")
    assert empty.records == [] and empty.stop_lsn is None and "could not find" in empty.error


def test_restore_command_is_derived_from_a_dbops_archive_command():
    assert restore_command_for(SETTINGS["archive_command"]) == "/venv/bin/dbops -c /etc/dbops.yaml wal-fetch %f %p"
    assert restore_command_for("cp %p /arch/%f") is None


# ----------------------------------------------------------------------------- CLI and configuration


def test_fence_hooks_config_key():
    assert _cfg(fence_hooks=["stop-vm pg1", "true"]).failover.fence_hooks == ("stop-vm pg1", "true")
    assert _cfg().failover.fence_hooks == ()


@pytest.mark.parametrize("args,needle", [
    (["failover", "--no-fence", "--yes"], "--no-fence goes with --primary-lost"),
    (["failover", "--primary-lost", "--max-lag", "1MiB", "--yes"], "--max-lag is for the planned switchover"),
])
def test_cli_usage_errors(cli, tmp_path, args, needle):
    cfg = tmp_path / "dbops.yaml"
    cfg.write_text("cluster: c\nstorage: {bucket: b}\nnodes: [{name: pg1, port: 5432, data_dir: /d}]\n")
    r = cli(["-c", str(cfg), *args])
    assert r.exit_code == 2 and needle in r.stderr, r


def test_walgap_expands_archive_command_and_lists_the_segments_only_standbys_had():
    from dbops.ops.failover.walgap import command_for, segments_between

    cmd = command_for("/v/dbops -c /e/d.yaml wal-push %p # 100%% %f", "/d/pg 1/pg_wal/X", "X")
    assert cmd == "/v/dbops -c /e/d.yaml wal-push '/d/pg 1/pg_wal/X' # 100% X"
    seg = 16 * 1024 * 1024
    assert segments_between(1, "000000010000000000000004", parse_lsn("0/7000100"), seg) == [
        "000000010000000000000005", "000000010000000000000006"]
    assert segments_between(1, "000000010000000000000004", parse_lsn("0/5000100"), seg) == []


def test_one_waldump_record_parser_serves_primary_lost_before_drop_and_restore():
    """pg/waldump.records reads every record line; waldrops and the restore's end scan read through it."""
    from dbops.ops.restore import wal as rwal
    from dbops.pg import waldrops

    line = ("rmgr: Transaction len (rec/tot):     82/    82, tx:          0, lsn: 0/03000150, prev 0/03000118, "
            "desc: COMMIT_PREPARED 731: 2026-11-29 20:01:04 UTC; rels: base/5/16384")
    recs = waldump.records(DUMP + line + "\n")
    assert [(r.rmgr, r.kind, r.xid) for r in recs] == [("Heap", "INSERT", 735), ("Transaction", "COMMIT", 735),
                                                       ("Transaction", "ABORT", 736), ("Standby", "RUNNING_XACTS", 0),
                                                       ("Transaction", "COMMIT_PREPARED", 0)]
    assert recs[0].lsn == parse_lsn("0/3000060") and recs[0].total_len == 54 and recs[0].desc == "off 2"
    assert waldump.parse_record("pg_waldump: error: whatever") is None
    assert waldump.xact_time(recs[-1].desc) == (731, waldump.xact_time("2026-11-29 20:01:04 UTC")[1])
    facts = waldrops.parse_lines("000000010000000000000003", 1, DUMP + line)
    assert [(c.xid, [f.path() for f in c.dropped]) for c in facts.commits] == [(735, []), (731, ["1663/5/16384"])]
    last = rwal.last_xact_end(recs[:4], "000000010000000000000003")
    assert last.lsn == parse_lsn("0/30000C0") and floss.iso(last.time) == "2026-11-29T20:01:03.500000+00:00"
