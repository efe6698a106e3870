"""`dbops backup` when pg_checksums fails on the proved copy: it runs while the new backup is stored,
so the store stops, nothing is listed, and the previous backup is marked failed (then healed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dbops.repo import catalog
from dbops.repo import manifest as mf
from dbops.repo.restore import restore_snapshot
from dbops.repo.store import store_snapshot

from labkit import pg_ctl
from test_backup_chain import backup, mark, sql, store_of

pytestmark = [pytest.mark.integration, pytest.mark.container]

PAGE = 8192


def flip_a_page(folder: Path) -> str:
    """Flip one byte in the middle of the first non-empty page of a template0 relation: a page no
    check reads (nobody connects to template0) and no replay touches, so only pg_checksums sees it."""
    for f in sorted((folder / "base" / "4").iterdir(), key=lambda p: -p.stat().st_size):
        if not f.name.isdigit():
            continue
        data = bytearray(f.read_bytes())
        for off in range(0, len(data), PAGE):
            if any(data[off:off + PAGE]):
                data[off + PAGE // 2] ^= 0xFF
                f.write_bytes(bytes(data))
                return str(f.relative_to(folder))
    raise AssertionError("no relation page in template0")


def test_checksum_failure_during_the_store_lists_nothing_and_fails_the_previous(make_lab, cli, tmp_path):
    lab = make_lab(replicas=0)
    assert sql(lab.primary, "SELECT oid FROM pg_database WHERE datname = 'template0'")[0][0] == 4
    mark(lab.primary, 1)
    r1, b1 = backup(cli, lab)
    assert r1.exit_code == 0, r1
    # A backup whose stored blocks match their hashes but hold a page with a bad checksum: b1's files
    # with one byte flipped, stored again as the newest backup (as storage rot caught before upload would).
    store, layout = store_of(lab)
    cfg = lab.config
    m1 = mf.load(store, layout, b1["backup_id"])
    folder = tmp_path / "copy"
    restore_snapshot(store, layout, m1, str(folder), parallel=2, durable=False)
    flipped = flip_a_page(folder)
    bad_id = catalog.new_backup_id()
    store_snapshot(store, layout, str(folder), backup_id=bad_id, parent_manifests=(m1,), pg=m1.pg,
                   compression=cfg.compression, chunk_size=cfg.backup.chunk_size, pack_size=cfg.backup.pack_size,
                   parallel=2, meta={**m1.meta, "kind": "full"})
    rows = json.loads(cli(["-c", lab.config_path, "backup", "list", "--json"]).stdout)
    assert [x["backup_id"] for x in rows] == [b1["backup_id"], bad_id]
    packs_before = {o.key for o in store.list(layout.packs_prefix())}

    mark(lab.primary, 2)
    r2 = cli(["-c", lab.config_path, "-v", "backup"])
    assert r2.exit_code == 7, r2
    assert f"backup {bad_id} failed validation: pg_checksums found bad pages" in r2.stderr, r2.stderr
    assert "pg_checksums runs on while the copy is stored" in r2.stderr  # the store ran meanwhile
    assert Path(flipped).name in r2.stderr  # pg_checksums' own report names the file

    rows = json.loads(cli(["-c", lab.config_path, "backup", "list", "--json"]).stdout)
    assert [x["backup_id"] for x in rows[:2]] == [b1["backup_id"], bad_id]
    assert rows[1]["status"] == "failed" and "pg_checksums" in catalog.latest_status(store, layout, bad_id).reason
    # Nothing of the cut-short incremental is listed: only the healing full backup came after.
    assert len(rows) == 3 and rows[2]["kind"] == "full" and rows[2]["parent_id"] is None, rows
    healed = rows[2]["backup_id"]
    # What the incremental stored before it stopped is in packs no manifest lists (orphans retention removes).
    listed = {layout.pack(p) for x in rows for p in mf.load(store, layout, x["backup_id"]).packs()}
    stored_since = {o.key for o in store.list(layout.packs_prefix())} - packs_before
    assert not (stored_since - {layout.pack(p) for p in mf.load(store, layout, healed).packs()}) & listed

    r3, b3 = backup(cli, lab)
    assert r3.exit_code == 0, r3
    assert b3["validated"]["backup_id"] == healed


def test_full_backup_with_a_bad_page_lists_nothing(make_lab, cli):
    """A full backup's pg_checksums runs beside its final store too: a bad page on the source
    (template0, which nothing reads or replays) stops it, and nothing is listed."""
    lab = make_lab(replicas=0)
    data = Path(lab.primary.data_dir)
    pg_ctl(data, "stop", "-m", "fast", "-w")
    flipped = flip_a_page(data)
    pg_ctl(data, "start", "-w", "-l", str(lab.dir / "logs" / "pg1-restarted.log"))
    r = cli(["-c", lab.config_path, "-v", "backup", "--full"])
    assert r.exit_code == 7, r
    assert "pg_checksums found bad pages" in r.stderr, r.stderr
    assert "pg_checksums runs on while the copy is stored" in r.stderr  # the store ran meanwhile
    assert Path(flipped).name in r.stderr
    assert json.loads(cli(["-c", lab.config_path, "backup", "list", "--json"]).stdout) == []
