"""Encryption at rest against a real lab (PostgreSQL 15, SeaweedFS S3): nothing readable in the bucket,
restores with the right key, refusal of a wrong or missing key, tamper detection that heals the chain,
and a key rotation with PITR across it (WAL fetched by `dbops wal-fetch` as restore_command)."""

from __future__ import annotations

import json
import os
import pwd
import re
import time

import pytest
import zstandard

from dbops import config as cfgmod
from dbops.lab.harness import free_port
from dbops.repo import manifest as mf
from dbops.storage import keys, open_store
from dbops.storage.cryptformat import HEADER, SEGMENT, TAG, header_key_id
from dbops.storage.layout import Layout
from dbops.storage.s3 import S3Store
from dbops import proc
from dbops.pg import binaries
from labkit import backup_cli, iso, now_on, restored, rows, sql, stop, switch_and_archive

pytestmark = [pytest.mark.integration, pytest.mark.container]

MARKER = "ZEBRA-CRYPT-MARKER-4f1d9a"


def put_marker(node, table: str, tag: str, n: int = 300) -> None:
    sql(node, f"CREATE TABLE IF NOT EXISTS {table} (id serial PRIMARY KEY, note text)")
    sql(node, f"INSERT INTO {table} (note) SELECT '{MARKER} {tag} ' || g FROM generate_series(1, {n}) g")


def raw_objects(lab) -> dict[str, bytes]:
    """Every object under the lab's prefix, as stored (no decryption)."""
    s = S3Store(lab.config.storage)
    return {o.key: s.get(o.key) for o in s.list(lab.config.storage.prefix + "/")}


def readable(data: bytes) -> bytes:
    """The bytes as stored plus whatever zstd frames inside them decompress to (WAL, manifests, packs)."""
    out = [data]
    for m in re.finditer(re.escape(b"\x28\xb5\x2f\xfd"), data):
        try:
            r = zstandard.ZstdDecompressor().stream_reader(data[m.start():], read_across_frames=False)
            out.append(r.read(64 << 20))
        except zstandard.ZstdError:
            continue
    return b"".join(out)


def holding_marker(objects: dict[str, bytes]) -> list[str]:
    return [k for k, v in objects.items() if MARKER.encode() in readable(v)]


def with_config(lab, name: str, **encryption) -> str:
    """A copy of the lab's configuration with another storage.encryption section."""
    text = (lab.dir / "dbops.yaml").read_text()
    text = re.sub(r"  encryption:\n(    .*\n)*", "", text)
    if encryption:
        block = "  encryption:\n" + "".join(f"    {k}: {json.dumps(v)}\n" for k, v in encryption.items())
        text = text.replace("storage:\n", "storage:\n" + block, 1)
    p = lab.dir / name
    p.write_text(text)
    return str(p)


def key_file(lab, name: str) -> tuple[str, str]:
    p = lab.dir / name
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    text = keys.generate()
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    pw = pwd.getpwnam("postgres")  # archive_command / restore_command read it as postgres
    os.chown(p, pw.pw_uid, pw.pw_gid)
    return str(p), keys.key_id(keys.decode_key(text))


def test_plain_archive_shows_the_marker_and_refuses_an_encrypted_configuration(make_lab, cli):
    """The scan can fail: without encryption the marker is found in the bucket. And an encrypted
    configuration pointed at this plain archive is refused (exit 16), not silently mixed."""
    lab = make_lab(replicas=0, encrypt=False)
    put_marker(lab.primary, "plain_marks", "plain")
    seg = switch_and_archive(lab)
    found = holding_marker(raw_objects(lab))
    assert any("/wal/" in k for k in found), found

    kf, kid = key_file(lab, "other.key")
    enc_cfg = with_config(lab, "enc.yaml", key_file=kf)
    r = cli(["-c", enc_cfg, "wal-fetch", seg, str(lab.dir / "seg")])
    assert r.exit_code == 16, r.output
    assert "not encrypted" in r.stderr and "allow_plaintext" in r.stderr
    r = cli(["-c", enc_cfg, "check", "--skip-runtime", "--json"])
    enc = json.loads(r.stdout)["storage"]["encryption"]
    assert enc["archive_encrypted"] is False and enc["key_id"] == kid
    mig_cfg = with_config(lab, "mig.yaml", key_file=kf, allow_plaintext=True)
    r = cli(["-c", mig_cfg, "wal-fetch", seg, str(lab.dir / "seg")])
    assert r.exit_code == 0, r.output


def test_encrypted_archive_end_to_end(make_lab, cli):
    lab = make_lab(replicas=0)  # the lab encrypts by default
    p = lab.primary
    cfg_path = lab.config_path
    k1 = keys.key_id(keys.read_key_file(str(lab.dir / "encryption.key"), "lab"))
    assert oct(os.stat(lab.dir / "encryption.key").st_mode & 0o777) == "0o600"

    # -- backup A under key 1
    put_marker(p, "marks", "one")
    switch_and_archive(lab)
    ra, a = backup_cli(cli, cfg_path)
    assert ra.exit_code == 0, ra.output

    # -- `dbops check` names the key; a wrong and a missing key are refused with exit 16
    r = cli(["-c", cfg_path, "check", "--skip-runtime", "--json"])
    enc = json.loads(r.stdout)["storage"]["encryption"]
    assert enc == {"configured": True, "key_id": k1, "archive_encrypted": True, "archive_key_id": k1}
    wrong_file, wrong_id = key_file(lab, "wrong.key")
    r = cli(["-c", with_config(lab, "wrong.yaml", key_file=wrong_file), "restore", "--to", "latest",
             "--target-dir", str(lab.dir / "never")])
    assert r.exit_code == 16, r.output
    assert f"needs key ID {k1}" in r.stderr and wrong_id in r.stderr
    r = cli(["-c", with_config(lab, "nokey.yaml"), "backup", "list"])
    assert r.exit_code == 16 and "no encryption key is configured" in r.stderr, r.output
    assert not (lab.dir / "never").exists() or not any((lab.dir / "never").iterdir())

    # -- rotate to key 2 (key 1 stays readable), then rows on both sides of a time t_mid
    k2_file, k2 = key_file(lab, "encryption-2.key")
    text = (lab.dir / "dbops.yaml").read_text()
    (lab.dir / "dbops.yaml").write_text(text.replace(
        f"    key_file: {lab.dir / 'encryption.key'}\n",
        f"    key_file: {k2_file}\n    old_key_files: [{lab.dir / 'encryption.key'}]\n"))
    put_marker(p, "marks", "two", 5)
    switch_and_archive(lab)
    time.sleep(0.05)
    t_mid = now_on(p)
    time.sleep(0.05)
    put_marker(p, "marks", "three", 7)
    switch_and_archive(lab)
    rb, b = backup_cli(cli, cfg_path)  # validates A (key 1) replaying WAL sealed with both keys
    assert rb.exit_code == 0, rb.output
    assert b["validated"]["backup_id"] == a["backup_id"] and b["validated"]["ok"]

    # -- every object in the bucket is ciphertext under key 1 or 2; the marker is in none
    objects = raw_objects(lab)
    assert objects and holding_marker(objects) == []
    ids = {k: header_key_id(v) for k, v in objects.items()}
    assert not [k for k, i in ids.items() if i not in (k1, k2)], ids
    assert {k1, k2} <= set(ids.values())
    assert any("/packs/" in k for k in ids) and any("/wal/" in k for k in ids)

    # -- PITR across the rotation: backup A (key 1) + WAL sealed with both keys, paused at t_mid
    port, target = free_port(), lab.dir / "pitr"
    r = cli(["-c", cfg_path, "restore", "--to", iso(t_mid), "--target-dir", str(target), "--pause", "--start",
             "--port", str(port), "--json"])
    assert r.exit_code == 0, r.output
    try:
        assert json.loads(r.stdout)["backup_id"] == a["backup_id"]
        got = rows(restored(lab, port), "marks")
        assert len(got) == 305 and all(" three " not in x for x in got) and sum(" two " in x for x in got) == 5
    finally:
        stop(target)
    # -- then PostgreSQL's own recovery rolls on to the end of the archive: every segment comes
    #    through restore_command = `dbops wal-fetch` (decrypting), and the server promotes
    conf = target / "postgresql.auto.conf"
    text = conf.read_text()
    assert "wal-fetch %f" in text and (target / "recovery.signal").exists()
    conf.write_text("".join(line + "\n" for line in text.splitlines()
                            if not line.strip().startswith(("recovery_target", "port"))) + f"port = {port}\n")
    logfile = target / "log" / "roll-forward.log"
    pw = pwd.getpwnam("postgres")
    (target / "log").mkdir(exist_ok=True)
    os.chown(target / "log", pw.pw_uid, pw.pw_gid)
    proc.run([binaries.binary("pg_ctl"), "-D", str(target), "-l", str(logfile), "-w", "-t", "120", "start"],
             user="postgres", timeout=150)
    try:
        node = restored(lab, port)
        deadline = time.monotonic() + 120
        while sql(node, "SELECT pg_is_in_recovery()")[0][0]:
            assert time.monotonic() < deadline, logfile.read_text()[-3000:]
            time.sleep(0.3)
        assert len(rows(node, "marks")) == 312
    finally:
        stop(target)
    assert "restored log file" in logfile.read_text()

    # -- backup B (key 2) restores too (named with --backup: exactly B, no fallback to the validated A)
    port, target = free_port(), lab.dir / "latest"
    r = cli(["-c", cfg_path, "restore", "--to", "latest", "--backup", b["backup_id"], "--target-dir", str(target),
             "--start", "--port", str(port), "--json"])
    assert r.exit_code == 0, r.output
    try:
        assert json.loads(r.stdout)["backup_id"] == b["backup_id"]
        assert len(rows(restored(lab, port), "marks")) == 312
    finally:
        stop(target)

    # -- a flipped byte inside a stored frame of B: the next backup fails B and heals the chain
    cfg = cfgmod.load(cfg_path)
    store, layout = open_store(cfg.storage), Layout(cfg.storage.prefix)
    m = mf.load(store, layout, b["backup_id"])
    ref = next(c for f in m.files if f.path.startswith("base/") for c in f.chunks
               if c.pack is not None and c.pack in {x for x in m.packs()} and c.length > 100)
    key = layout.pack(ref.pack)
    raw = S3Store(cfg.storage)
    stored = bytearray(raw.get(key))
    at = ref.offset + ref.length // 2
    stored[HEADER + (at // SEGMENT) * (SEGMENT + TAG) + at % SEGMENT] ^= 0x01
    raw.put(key, bytes(stored))
    r = cli(["-c", cfg_path, "verify", "--all"])
    assert r.exit_code == 7 and key in r.output and "authentication" in r.output, r.output
    put_marker(p, "marks", "four", 3)
    r = cli(["-c", cfg_path, "backup"])
    assert r.exit_code == 7, r.output
    assert b["backup_id"] in r.stderr and "healed" in r.stderr and "authentication" in r.stderr
    listed = json.loads(cli(["-c", cfg_path, "backup", "list", "--json"]).stdout)
    state = {x["backup_id"]: x["status"] for x in listed}
    assert state[b["backup_id"]] == "failed" and listed[-1]["kind"] == "full"
    assert header_key_id(raw.get(layout.manifest(listed[-1]["backup_id"]))) == k2
