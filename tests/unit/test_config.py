"""Configuration parsing: every problem at once, ${ENV} interpolation, secrets redacted."""

import json

import pytest
import yaml

from dbops import config as cfgmod
from dbops import secrets
from dbops.errors import ConfigError, ExitCode

GOOD = {
    "cluster": "main",
    "nodes": [
        {"name": "pg1", "host": "10.0.0.1", "port": 5432, "data_dir": "/var/lib/postgresql/15/main",
         "password": "${PG_PASSWORD}"},
        {"name": "pg2", "host": "10.0.0.2", "controller": "ssh", "ssh": {"host": "10.0.0.2"}},
    ],
    "storage": {"endpoint": "http://minio:9000", "bucket": "backups", "prefix": "/main/",
                "access_key": "${S3_KEY}", "secret_key": "${S3_SECRET}"},
    "runtime": {"engine": "docker", "image": "postgres:15"},
    "backup": {"source": "pg2", "chunk_size": "64KiB", "retention": {"keep_last": 7, "keep_within": "14d"},
               "validation": {"assertions": [{"name": "orders exist", "sql": "select count(*) > 0 from orders"}]}},
    "failover": {"timeout": "30s", "pgbouncer": {"port": 6432, "password": "${PGB_PW}"}},
}
ENV = {"PG_PASSWORD": "pg-secret-123", "S3_KEY": "AKIAEXAMPLE", "S3_SECRET": "s3-secret-value-xyz",
       "PGB_PW": "bouncer-secret"}


def test_good_config_parses_with_env_and_defaults():
    cfg = cfgmod.parse(GOOD, env=ENV)
    assert cfg.cluster == "main"
    assert cfg.node("pg1").password == "pg-secret-123"
    assert cfg.node("pg2").controller == "ssh" and cfg.node("pg2").ssh.host == "10.0.0.2"
    assert cfg.storage.prefix == "main"
    assert cfg.storage.secret_key == "s3-secret-value-xyz"
    assert cfg.backup.chunk_size == 65536
    assert cfg.backup.retention.keep_within == 14 * 86400
    assert cfg.failover.timeout == 30.0
    assert cfg.compression.algorithm == "zstd" and cfg.compression.level == 3
    assert cfg.backup.validation.assertions[0].database == "postgres"


def test_three_mistakes_reported_at_once():
    raw = json.loads(json.dumps(GOOD))
    raw["nodes"][0]["port"] = "not-a-port"
    raw["storage"]["endpoint"] = "minio:9000"
    raw["compression"] = {"algorithm": "lz5"}
    with pytest.raises(ConfigError) as ei:
        cfgmod.parse(raw, env=ENV, path="x.yaml")
    e = ei.value
    assert e.exit_code == ExitCode.CONFIG == 3
    assert len(e.problems) == 3, e.problems
    joined = "\n".join(e.problems)
    assert "nodes[0].port" in joined and "expected an integer" in joined
    assert "storage.endpoint" in joined and "http://" in joined
    assert "compression.algorithm" in joined and "zstd" in joined
    assert "3 problems" in e.message


def test_missing_env_var_and_unknown_key_and_missing_required():
    raw = {"cluster": "c", "nodes": [{"name": "a", "data_dir": "/d", "pasword": "x"}],
           "storage": {"bucket": "bkt", "secret_key": "${NOPE}", "region": "${R:-eu-west-1}"}}
    with pytest.raises(ConfigError) as ei:
        cfgmod.parse(raw, env={})
    joined = "\n".join(ei.value.problems)
    assert "nodes[0].pasword: unknown key" in joined
    assert "environment variable NOPE is not set" in joined
    assert len(ei.value.problems) == 2, ei.value.problems
    raw["storage"]["secret_key"] = "literal"
    raw["nodes"][0].pop("pasword")
    with pytest.raises(ConfigError) as ei:
        cfgmod.parse(raw, env={})
    assert [p for p in ei.value.problems] == ["storage: access_key and secret_key go together "
                                              "(or leave both out to use boto3's credential chain)"]
    raw["storage"]["access_key"] = "ak"
    assert cfgmod.parse(raw, env={}).storage.region == "eu-west-1"


def test_local_controller_needs_data_dir_and_runtime_needs_image():
    raw = {"cluster": "c", "nodes": [{"name": "a"}], "storage": {"bucket": "bkt"}, "runtime": {"engine": "podman"}}
    with pytest.raises(ConfigError) as ei:
        cfgmod.parse(raw, env={})
    joined = "\n".join(ei.value.problems)
    assert "nodes[0].data_dir" in joined
    assert "needs an image" in joined


def test_redacted_hides_every_secret():
    cfg = cfgmod.parse(GOOD, env=ENV)
    text = yaml.safe_dump(cfgmod.redacted(cfg))
    for v in ENV.values():
        if v != "AKIAEXAMPLE":
            assert v not in text
    assert "***" in text
    assert "AKIAEXAMPLE" not in text  # access keys are treated as secret too


def test_secrets_registered_and_redacted_from_text():
    cfgmod.parse(GOOD, env=ENV)
    assert secrets.redact("connect password=pg-secret-123 to x") == "connect password=*** to x"
    assert "s3-secret-value-xyz" not in secrets.redact("boto says s3-secret-value-xyz")


def test_load_reports_yaml_syntax_error_with_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("cluster: a\nnodes: [\n")
    with pytest.raises(ConfigError) as ei:
        cfgmod.load(str(p))
    assert "not valid YAML" in ei.value.message and "line" in ei.value.message


def test_missing_file_is_config_error(tmp_path):
    with pytest.raises(ConfigError) as ei:
        cfgmod.load(str(tmp_path / "nope.yaml"))
    assert ei.value.exit_code == 3


@pytest.mark.parametrize("text,seconds", [("30s", 30), ("5m", 300), ("12h", 43200), ("14d", 1209600), ("90", 90)])
def test_durations(text, seconds):
    assert cfgmod.parse_duration(text) == seconds


@pytest.mark.parametrize("text,n", [("16MiB", 16 * 1024 * 1024), ("64KiB", 65536), ("1GB", 10**9), (4096, 4096)])
def test_sizes(text, n):
    assert cfgmod.parse_size(text) == n


def test_retention_auto_scratch_limit_and_the_pack_size_cap():
    raw = json.loads(json.dumps(GOOD))
    raw["backup"]["retention"]["auto"] = True
    raw["backup"]["scratch_limit"] = "20Gi"  # Kubernetes' spelling, copied from an emptyDir
    cfg = cfgmod.parse(raw, env=ENV)
    assert cfg.backup.retention.auto is True
    assert cfg.backup.scratch_limit == 20 * 1024**3
    assert cfgmod.parse(GOOD, env=ENV).backup.retention.auto is False
    assert cfgmod.parse(GOOD, env=ENV).backup.scratch_limit is None

    raw["backup"]["retention"] = {"auto": True}  # nothing to apply
    raw["backup"]["pack_size"] = "5GiB"  # S3 refuses a single PUT above 5 GiB
    raw["backup"]["scratch_limit"] = "lots"
    with pytest.raises(ConfigError) as ei:
        cfgmod.parse(raw, env=ENV)
    joined = "\n".join(ei.value.problems)
    assert len(ei.value.problems) == 3, ei.value.problems
    assert "backup.retention.auto: needs a policy" in joined
    assert "backup.pack_size: must be at most 4GiB" in joined
    assert "backup.scratch_limit: expected a size" in joined
    raw["backup"]["pack_size"] = "4GiB"
    raw["backup"]["scratch_limit"] = "512MiB"
    raw["backup"]["retention"] = {"auto": "yes", "keep_last": 2}
    cfg = cfgmod.parse(raw, env=ENV)
    assert cfg.backup.pack_size == cfgmod.MAX_PACK_SIZE and cfg.backup.retention.auto


def test_scratch_cache_is_auto_keep_or_drop():
    assert cfgmod.parse(GOOD, env=ENV).backup.scratch_cache == "auto"
    raw = json.loads(json.dumps(GOOD))
    raw["backup"]["scratch_cache"] = "drop"
    assert cfgmod.parse(raw, env=ENV).backup.scratch_cache == "drop"
    raw["backup"]["scratch_cache"] = "sometimes"
    with pytest.raises(ConfigError) as ei:
        cfgmod.parse(raw, env=ENV)
    assert ei.value.exit_code == ExitCode.CONFIG
    assert ei.value.problems == ["backup.scratch_cache: expected one of auto, keep, drop, got 'sometimes'"]


def test_a_restore_target_built_with_gnu_date_is_accepted():
    """docs/restore.md: `date -d 'yesterday 15:46' -Iseconds` names the time with its zone."""
    import subprocess
    from datetime import datetime, timedelta

    from dbops.ops.restore.target import from_options

    text = subprocess.run(["date", "-d", "yesterday 15:46", "-Iseconds"], env={"TZ": "Europe/Paris"},
                          capture_output=True, text=True, check=True).stdout.strip()
    t = from_options(to=text, to_lsn=None, to_xid=None, to_name=None, exclusive=False)
    local = datetime.fromisoformat(text)
    assert local.utcoffset() in (timedelta(hours=1), timedelta(hours=2)) and local.hour == 15 and local.minute == 46
    assert t.kind == "time" and abs(t.epoch - local.timestamp()) < 1e-6
