"""The shadow folder pg_checksums reads: hard links to every file it would read but the main-fork
segments the server verified (all their segments, not their other forks), pg_control copied,
tablespaces through their links; nothing made when a link cannot be."""

from __future__ import annotations

import os
from pathlib import Path

from dbops.ops.backup import shadow


def _file(p: Path, body: bytes = b"x" * 100) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(body)


def test_links_all_but_the_verified_main_forks(tmp_path, monkeypatch):
    monkeypatch.setattr(shadow, "SEGMENT_BYTES", 100)  # the files' size: each segment before the last is full
    monkeypatch.setattr(shadow, "PAGE", 50)  # whole blocks
    data, tblspc = tmp_path / "data", tmp_path / "tblspc" / "16400"
    for rel in ("global/pg_control", "global/1262", "base/5/16384", "base/5/16384.1", "base/5/16384_fsm",
                "base/5/16384_vm", "base/5/16390", "base/5/163841", "base/5/PG_VERSION", "pg_wal/000000010000000000000001",
                "postgresql.conf"):
        _file(data / rel)
    _file(tblspc / "PG_15_202209061" / "5" / "16401")
    _file(tblspc / "PG_15_202209061" / "5" / "16402")
    (data / "pg_tblspc").mkdir()
    os.symlink(tblspc, data / "pg_tblspc" / "16400")
    verified = {"base/5/16384", "global/1262", "pg_tblspc/16400/PG_15_202209061/5/16401"}
    s = shadow.build(data, tmp_path / "shadow", verified)
    assert s is not None
    got = {str(p.relative_to(s.path)) for p in s.path.rglob("*") if p.is_file()}
    assert got == {"global/pg_control", "base/5/16384_fsm", "base/5/16384_vm", "base/5/16390", "base/5/163841",
                   "base/5/PG_VERSION", "pg_tblspc/16400/PG_15_202209061/5/16402"}
    assert (s.linked, s.left_out, s.left_out_bytes) == (6, 4, 400)
    # links, not copies (pg_control is a copy: the only file a tool may write)
    assert os.stat(s.path / "base/5/16390").st_ino == os.stat(data / "base/5/16390").st_ino
    assert os.stat(s.path / "global/pg_control").st_ino != os.stat(data / "global/pg_control").st_ino
    assert not (s.path / "pg_tblspc" / "16400").is_symlink()


def test_no_shadow_when_a_file_cannot_be_linked(tmp_path, monkeypatch):
    data = tmp_path / "data"
    _file(data / "global/pg_control")
    _file(data / "base/5/16390")

    def cross_device(*a, **k):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(shadow.os, "link", cross_device)
    assert shadow.build(data, tmp_path / "shadow", {"base/5/1"}) is None
    assert not (tmp_path / "shadow").exists()


def test_a_linked_file_stays_known_unchanged(tmp_path, monkeypatch):
    """A hard link changes a file's ctime: the record follows it, so the store still takes the file
    as the download left it; a file written after the seal is still seen as changed."""
    monkeypatch.setattr(shadow, "PAGE", 50)  # the 100-byte files are whole blocks
    from dbops.repo.known import Known

    data = tmp_path / "data"
    for rel in ("global/pg_control", "base/5/16390", "base/5/16391", "base/5/16384"):
        _file(data / rel)
    known = Known()
    for rel in ("base/5/16390", "base/5/16391", "base/5/16384"):
        known.record(rel, str(data / rel))
    known.seal(str(tmp_path))
    with open(data / "base/5/16391", "r+b") as f:  # written after the seal: not the recorded content
        f.write(b"y")
    ctime = os.stat(data / "base/5/16390").st_ctime_ns
    s = shadow.build(data, tmp_path / "shadow", {"base/5/16384"}, linked=known.linked)
    assert s is not None and s.linked == 2
    assert os.stat(data / "base/5/16390").st_ctime_ns != ctime  # what the record had to follow
    assert known.usable()
    assert known.unchanged("base/5/16390", str(data / "base/5/16390"), 100)
    assert not known.unchanged("base/5/16391", str(data / "base/5/16391"), 100)
    assert known.unchanged("base/5/16384", str(data / "base/5/16384"), 100)  # not linked: as recorded
    ctime = os.stat(data / "base/5/16390").st_ctime_ns
    shadow.remove(s.path, data, known.linked)  # unlinking changes the ctime again: followed too
    assert not s.path.exists()
    assert os.stat(data / "base/5/16390").st_ctime_ns != ctime
    assert known.usable()
    assert known.unchanged("base/5/16390", str(data / "base/5/16390"), 100)
    assert not known.unchanged("base/5/16391", str(data / "base/5/16391"), 100)


def test_an_existing_shadow_folder_falls_back_to_reading_the_copy(tmp_path):
    data = tmp_path / "data"
    _file(data / "global/pg_control")
    _file(data / "base/5/16384")
    (tmp_path / "shadow").mkdir()
    assert shadow.build(data, tmp_path / "shadow", {"base/5/16384"}) is None


def test_a_segment_after_a_short_one_is_left_to_pg_checksums(tmp_path, monkeypatch):
    """A scan counts blocks segment by segment up to the first short one: what lies after it (no
    scan reads it) is checked by pg_checksums."""
    monkeypatch.setattr(shadow, "SEGMENT_BYTES", 200)
    monkeypatch.setattr(shadow, "PAGE", 50)
    data = tmp_path / "data"
    _file(data / "global/pg_control")
    _file(data / "base/5/16384", b"x" * 200)  # full
    _file(data / "base/5/16384.1", b"x" * 100)  # short: the last a scan reads
    _file(data / "base/5/16384.2", b"x" * 100)  # never read by a scan
    s = shadow.build(data, tmp_path / "shadow", {"base/5/16384"})
    assert s is not None
    assert {str(p.relative_to(s.path)) for p in s.path.rglob("*") if p.is_file()} == {
        "global/pg_control", "base/5/16384.2"}
    assert (s.linked, s.left_out, s.left_out_bytes) == (1, 2, 300)


def test_a_verified_main_fork_ending_in_a_partial_block_is_left_to_pg_checksums(tmp_path):
    """A scan ignores a partial last block; pg_checksums refuses it: such a file is linked."""
    data = tmp_path / "data"
    _file(data / "global/pg_control")
    _file(data / "base/5/16384", b"x" * (2 * shadow.PAGE))
    _file(data / "base/5/16390", b"x" * (2 * shadow.PAGE + 5))
    s = shadow.build(data, tmp_path / "shadow", {"base/5/16384", "base/5/16390"})
    assert s is not None
    assert {str(p.relative_to(s.path)) for p in s.path.rglob("*") if p.is_file()} == {
        "global/pg_control", "base/5/16390"}
    assert (s.linked, s.left_out) == (1, 1)



def _config():
    from dbops import config as cfgmod

    return cfgmod.parse({"cluster": "c", "nodes": [{"name": "pg1", "host": "127.0.0.1", "data_dir": "/nonexistent"}],
                         "storage": {"bucket": "backups", "access_key": "k", "secret_key": "s"},
                         "runtime": {"engine": "none"}}, env={})


class _Here:
    """A stopped instance whose tools run on this host as the postgres OS user (the real pg_checksums)."""

    def __init__(self, data: Path):
        self.data_path = str(data)

    def run_tool(self, argv, **kw):
        from dbops import proc

        return proc.run(argv, user="postgres", check=False, timeout=60)


def test_pg_checksums_unable_to_read_the_copy_is_the_environment_not_bad_pages(tmp_path):
    """pg_checksums exits 1 when it cannot open a file: that says nothing against the backup (exit 17,
    the backup keeps its status), unlike a bad page (a ValidationError: the backup is marked failed)."""
    import pytest

    from dbops.errors import ValidationEnvironmentError

    if os.geteuid() != 0:
        pytest.skip("needs root to run pg_checksums as the postgres OS user")
    cfg = _config()
    private = tmp_path / "private"  # the copy's parent, closed to the postgres OS user
    _file(private / "data" / "global" / "pg_control", b"\0" * 8192)
    os.chmod(private, 0o700)
    checks: list = []
    with pytest.raises(ValidationEnvironmentError) as ei:
        shadow.pg_checksums(cfg, _Here(private / "data"), private / "data", None, checks)
    assert "pg_checksums could not read the restored copy (Permission denied)" in ei.value.message
    assert "pg_control" in (ei.value.detail or "")
    assert checks == [{"check": "pg_checksums", "files": "all", "ok": False}]



def test_a_denial_by_the_copy_itself_is_the_backups(tmp_path):
    """pg_checksums denied a file of the copy: the backup's fault when the file, or a folder of the copy
    on its way, denies its owner by its own mode (modes come from the manifest); the machine's when
    the copy grants it (a folder above the copy denied it, whoever owns that)."""
    owner = 4242
    data = tmp_path / "scratch" / "data"
    _file(data / "base" / "1" / "1249")
    for p in (tmp_path / "scratch", data, data / "base", data / "base" / "1", data / "base" / "1" / "1249"):
        os.chown(p, owner, owner)
    roots = [data, data.parent / shadow.SHADOW]
    msg = 'pg_checksums: error: could not open file "{}": Permission denied\n'.format(data / "base" / "1" / "1249")

    def denied(text: str = msg, seen_as=None) -> bool:
        return shadow.denied_by_the_copy(text, owner, roots, seen_as)

    assert not denied()  # the copy grants it: something above it denied
    os.chmod(data / "base" / "1" / "1249", 0o200)
    assert denied()  # the file's own mode
    os.chmod(data / "base" / "1" / "1249", 0o600)
    os.chmod(data / "base" / "1", 0o600)
    assert denied()  # a folder of the copy on the way
    os.chmod(data / "base" / "1", 0o700)
    os.chmod(data, 0o600)
    assert denied()  # the copy's own root
    os.chmod(data, 0o700)
    os.chmod(tmp_path / "scratch", 0o600)  # a folder above the copy, the owner's: no manifest set that
    assert not denied()
    os.chmod(tmp_path / "scratch", 0o700)
    os.chmod(tmp_path, 0o700)  # root's folder above the copy: the machine's doing
    assert not denied()
    # a container's path, as pg_checksums in a one-shot container names it
    inside = 'could not open file "/data/base/1/1249": Permission denied'
    assert denied(inside)  # not translated: nothing says it was the machine
    assert not denied(inside, {"/data": str(data)})
    os.chmod(data / "base" / "1" / "1249", 0)
    assert denied(inside, {"/data": str(data)})
    assert denied('could not open file "/elsewhere/x": Permission denied', {"/data": str(data)})
    assert denied("pg_checksums: error: Permission denied")


def test_a_denial_above_a_copy_reached_through_a_link_is_the_machines(tmp_path):
    """The tool names resolved paths; a scratch folder reached through a symbolic link (moved to a
    bigger disk) is still the copy's root once resolved: a folder above it denying is the machine's."""
    import pytest

    from dbops.errors import ValidationEnvironmentError

    if os.geteuid() != 0:
        pytest.skip("needs root to run pg_checksums as the postgres OS user")
    real = tmp_path / "real"  # root's, 0700: the postgres OS user cannot pass
    _file(real / "scratch" / "data" / "global" / "pg_control", b"\0" * 8192)
    os.chmod(real, 0o700)
    (tmp_path / "link").symlink_to(real)
    data = tmp_path / "link" / "scratch" / "data"

    class Resolved(_Here):  # as a host-run tool is given its folder: resolved
        def run_tool(self, argv, **kw):
            return super().run_tool([str(data.resolve()) if a == str(data) else a for a in argv], **kw)

    with pytest.raises(ValidationEnvironmentError):
        shadow.pg_checksums(_config(), Resolved(data), data, None, [])


def test_a_denial_above_the_copy_checked_through_its_shadow_folder_is_the_machines(tmp_path):
    """With a shadow folder (the usual case: a restart point was written), the path pg_checksums names
    is the shadow's: it is judged before the shadow folder is removed."""
    import pytest

    from dbops.errors import ValidationEnvironmentError

    import shutil

    if os.geteuid() != 0:
        pytest.skip("needs root to run pg_checksums as the postgres OS user")
    closed = tmp_path / "closed"  # root's, 0700: the postgres OS user cannot pass
    data = closed / "scratch" / "data"
    _file(data / "global" / "pg_control", b"\0" * 8192)
    _file(data / "base" / "5" / "16384", b"\0" * 8192)
    for dirpath, dirs, files in os.walk(closed / "scratch"):
        for n in [dirpath, *(os.path.join(dirpath, f) for f in files)]:
            shutil.chown(n, "postgres", "postgres")
    os.chmod(closed, 0o700)
    checks: list = []
    with pytest.raises(ValidationEnvironmentError):
        shadow.pg_checksums(_config(), _Here(data), data, {"base/5/99999"}, checks)
    assert checks[0]["files"] == 1 and not (data.parent / shadow.SHADOW).exists()


def test_pg_checksums_killed_or_never_run_is_the_environment_not_bad_pages(tmp_path):
    """pg_checksums exits 0 or 1 on its own: killed by a signal (directly, or 137 through a container:
    the OOM killer's SIGKILL), or its engine unable to run it (125), says nothing against the backup
    (exit 17, the backup keeps its status); a run that printed a bad page is still the backup's."""
    import pytest

    from dbops import proc
    from dbops.errors import ValidationEnvironmentError, ValidationError

    data = tmp_path / "data"
    _file(data / "global" / "pg_control", b"\0" * 8192)

    class Ends(_Here):
        def __init__(self, script: str):
            super().__init__(data)
            self.script = script

        def run_tool(self, argv, **kw):
            return proc.run(["sh", "-c", self.script], check=False, timeout=60)

    for script, said in (("kill -9 $$", "terminated by signal 9 (the OOM killer?)"),
                         ("exit 137", "terminated by signal 9 (the OOM killer?)"),
                         ("echo 'Error: OCI runtime error' >&2; exit 125", "could not run pg_checksums (status 125)")):
        checks: list = []
        with pytest.raises(ValidationEnvironmentError) as ei:
            shadow.pg_checksums(_config(), Ends(script), data, None, checks)
        assert said in ei.value.message, (script, ei.value.message)
        assert checks == [{"check": "pg_checksums", "files": "all", "ok": False}]
    bad = ('echo \'pg_checksums: error: checksum verification failed in file "base/5/16384", block 0\' >&2; '
           "echo 'Bad checksums:  1'; kill -9 $$")
    with pytest.raises(ValidationError) as ei:
        shadow.pg_checksums(_config(), Ends(bad), data, None, [])
    assert not isinstance(ei.value, ValidationEnvironmentError) and "bad pages" in ei.value.message
