"""The encryption layer (dbops.storage.crypt) over a local store: format, keys, failure modes."""

from __future__ import annotations

import os
import random

import pytest

from dbops import config as cfgmod
from dbops import secrets
from dbops.errors import ConfigError, DamagedObjectError, EncryptionError, ExitCode
from dbops.storage import keys
from dbops.storage.crypt import EncryptedStore
from dbops.storage.cryptformat import HEADER, SEGMENT, TAG, header_key_id
from dbops.storage.local import LocalStore


def ring(*ks: bytes, current: bool = True, allow_plaintext: bool = False) -> keys.Keyring:
    return keys.Keyring(current=ks[0] if current and ks else None, by_id={keys.key_id(k): k for k in ks},
                        allow_plaintext=allow_plaintext)


def new_key() -> bytes:
    k = keys.decode_key(keys.generate())
    assert k is not None
    return k


@pytest.fixture
def raw(tmp_path):
    return LocalStore(tmp_path / "s")


def test_roundtrip_whole_and_ranges(raw):
    s = EncryptedStore(raw, ring(new_key()), "pre")
    rnd = random.Random(5)
    for n in (0, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, 3 * SEGMENT + 11):
        data = rnd.randbytes(n)
        s.put("pre/dbops-v1/x", data)
        stored = raw.get("pre/dbops-v1/x")
        assert len(stored) == HEADER + max(1, -(-n // SEGMENT)) * TAG + n
        assert s.get("pre/dbops-v1/x") == data
        for _ in range(30):
            a, ln = rnd.randint(0, max(0, n - 1)), rnd.randint(1, 2 * SEGMENT)
            s._headers.clear()
            assert s.get_range("pre/dbops-v1/x", a, ln) == data[a:a + ln]


def test_ciphertext_hides_plaintext_and_is_fresh_per_write(raw):
    s = EncryptedStore(raw, ring(new_key()))
    marker = b"MARKER-0123456789" * 100
    s.put("a", marker)
    first = raw.get("a")
    s.put("a", marker)
    assert b"MARKER" not in first and raw.get("a") != first  # a new salt (so key) per object


def test_flipped_byte_is_detected_whole_and_ranged(raw):
    s = EncryptedStore(raw, ring(new_key()))
    data = os.urandom(3 * SEGMENT)
    s.put("o", data)
    stored = bytearray(raw.get("o"))
    stored[HEADER + SEGMENT + TAG + 100] ^= 1  # in segment 1
    raw.put("o", bytes(stored))
    with pytest.raises(DamagedObjectError) as ei:
        s.get("o")
    assert ei.value.exit_code == ExitCode.VALIDATION and "authentication" in ei.value.message
    assert s.get_range("o", 0, 100) == data[:100]  # other segments still open
    with pytest.raises(DamagedObjectError):
        s.get_range("o", SEGMENT + 5, 10)


def test_truncation_and_renaming_are_detected(raw):
    s = EncryptedStore(raw, ring(new_key()))
    s.put("o", os.urandom(2 * SEGMENT + 5))
    stored = raw.get("o")
    raw.put("o", stored[:HEADER + SEGMENT + TAG])  # cut at a segment boundary
    with pytest.raises(DamagedObjectError):
        s.get("o")
    raw.put("other", stored)  # a valid object under another name
    with pytest.raises(DamagedObjectError):
        s.get("other")


def test_wrong_key_names_the_expected_key_id(raw):
    k1, k2 = new_key(), new_key()
    EncryptedStore(raw, ring(k1)).put("o", b"secret")
    with pytest.raises(EncryptionError) as ei:
        EncryptedStore(raw, ring(k2)).get("o")
    assert ei.value.exit_code == ExitCode.ENCRYPTION
    assert keys.key_id(k1) in ei.value.message and keys.key_id(k2) in (ei.value.detail or "")
    assert header_key_id(raw.get("o")) == keys.key_id(k1)


def test_missing_key_for_encrypted_archive(raw):
    EncryptedStore(raw, ring(new_key())).put("o", b"x" * 10)
    with pytest.raises(EncryptionError) as ei:
        EncryptedStore(raw, ring()).get("o")
    assert "no encryption key is configured" in ei.value.message


def test_plain_object_refused_with_encryption_unless_migrating(raw):
    raw.put("o", b"plain")
    k = new_key()
    with pytest.raises(EncryptionError) as ei:
        EncryptedStore(raw, ring(k)).get("o")
    assert "allow_plaintext" in (ei.value.hint or "")
    with pytest.raises(EncryptionError):
        EncryptedStore(raw, ring(k)).get_range("o", 0, 3)
    mig = EncryptedStore(raw, ring(k, allow_plaintext=True))
    assert mig.get("o") == b"plain" and mig.get_range("o", 1, 2) == b"la"
    mig.put("n", b"new")
    assert header_key_id(raw.get("n")) == keys.key_id(k)


def test_rotation_old_keys_read_new_key_writes(raw):
    old, new = new_key(), new_key()
    EncryptedStore(raw, ring(old)).put("a", b"before")
    s = EncryptedStore(raw, ring(new, old))
    s.put("b", b"after")
    assert s.get("a") == b"before" and s.get("b") == b"after"
    assert header_key_id(raw.get("b")) == keys.key_id(new)
    assert s.key_id_of("a") == keys.key_id(old)


def test_get_to_file_decrypts(raw, tmp_path):
    s = EncryptedStore(raw, ring(new_key()))
    for n in (0, 3, SEGMENT, SEGMENT * 2 + 3):
        data = os.urandom(n)
        s.put("w", data, metadata={"sha256": "x"})
        info = s.get_to_file("w", str(tmp_path / "out"))
        assert (tmp_path / "out").read_bytes() == data and info.size == len(data)
    assert raw.head("w").metadata["sha256"] == "x"
    stored = bytearray(raw.get("w"))
    raw.put("w", bytes(stored[:HEADER + SEGMENT + TAG]))  # cut at a segment boundary
    with pytest.raises(DamagedObjectError):
        s.get_to_file("w", str(tmp_path / "out"))
    raw.put("p", b"plain")
    with pytest.raises(EncryptionError):
        s.get_to_file("p", str(tmp_path / "out2"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".sealed-")]


def test_config_keys_are_validated_secret_and_redacted(tmp_path):
    secrets.clear()
    k = keys.generate()
    base = {"cluster": "c", "nodes": [{"name": "n", "data_dir": "/x"}], "storage": {"bucket": "bkt"}}
    cfg = cfgmod.parse({**base, "storage": {"bucket": "bkt", "encryption": {"key": "${K}", "old_keys": [k]}}},
                       env={"K": k})
    assert cfg.storage.encryption.enabled
    shown = str(cfgmod.redacted(cfg))
    assert k not in shown and "***" in shown
    assert secrets.redact(f"boom {k}") == "boom ***"
    with pytest.raises(ConfigError) as ei:
        cfgmod.parse({**base, "storage": {"bucket": "bkt", "encryption": {"key": "c2hvcnQ="}}})
    assert "32 random bytes" in str(ei.value.detail) and "c2hvcnQ=" not in str(ei.value.detail)
    with pytest.raises(ConfigError):
        cfgmod.parse({**base, "storage": {"bucket": "bkt", "encryption": {"key": k, "key_file": "/f"}}})


def test_key_file_must_be_private(tmp_path):
    f = tmp_path / "key"
    f.write_text(keys.generate() + "\n")
    os.chmod(f, 0o644)
    with pytest.raises(ConfigError) as ei:
        keys.read_key_file(str(f), "storage.encryption.key_file")
    assert "chmod 600" in (ei.value.hint or "")
    os.chmod(f, 0o600)
    assert len(keys.read_key_file(str(f), "x")) == 32
    r = keys.load(cfgmod.EncryptionSettings(key_file=str(f)))
    assert r.current_id and r.current_id in repr(r) and "current=" in repr(r)


def test_key_generate_prints_or_writes_a_private_file(cli, tmp_path):
    r = cli(["key", "generate"])
    assert r.exit_code == 0 and keys.decode_key(r.stdout.strip()) is not None
    assert keys.key_id(keys.decode_key(r.stdout.strip())) in r.stderr
    out = tmp_path / "k"
    r = cli(["key", "generate", "--out", str(out)])
    assert r.exit_code == 0 and r.stdout == "" and os.stat(out).st_mode & 0o777 == 0o600
    assert keys.key_id(keys.read_key_file(str(out), "x")) in r.stderr
    before = out.read_text()
    r = cli(["key", "generate", "--out", str(out)])
    assert r.exit_code == ExitCode.PRECONDITION and out.read_text() == before


def test_check_reports_encryption_of_the_archive(raw):
    from dbops.config import EncryptionSettings, StorageSettings
    from dbops.ops.check import CheckReport, check_encryption
    from dbops.storage.layout import Layout

    k = new_key()
    text = keys.generate()
    EncryptedStore(raw, ring(k)).put("dbops-v1/identity.json", b"{}")
    s = StorageSettings(bucket="b", encryption=EncryptionSettings(key=text))
    rep = CheckReport()
    rep.storage = {}
    check_encryption(s, EncryptedStore(raw, ring(keys.decode_key(text), k)), Layout(s.prefix), rep)
    assert rep.storage["encryption"]["archive_key_id"] == keys.key_id(k)
    assert rep.findings[-1].status == "ok" and keys.key_id(k) in rep.findings[-1].message
    rep = CheckReport()
    rep.storage = {}
    check_encryption(s, EncryptedStore(raw, ring(keys.decode_key(text))), Layout(s.prefix), rep)
    assert rep.findings[-1].status == "fail" and "not configured" in rep.findings[-1].message


def test_put_file_seals_segment_by_segment(raw, tmp_path):
    s = EncryptedStore(raw, ring(new_key()), "pre")
    for n in (0, 5, SEGMENT, 2 * SEGMENT, 2 * SEGMENT + 1):
        src = tmp_path / f"f{n}"
        data = os.urandom(n)
        src.write_bytes(data)
        assert s.put_file("pre/f", str(src), metadata={"a": "b"})
        assert s.get("pre/f") == data and raw.head("pre/f").metadata["a"] == "b"
        assert len(raw.get("pre/f")) == HEADER + max(1, -(-n // SEGMENT)) * TAG + n
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".sealed-")) == []
