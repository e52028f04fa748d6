"""fetch without a network: file:// URLs, --source, the lock, the cache, offline."""
import json

import pytest

from kvmlab.core.errors import ChecksumError, FetchError
from kvmlab.core.fsutil import tree_sha256
from kvmlab.source.fetch import cache_path, fetch_source, stamp_path
from kvmlab.source.prepare import prepare
from support.fakeqemu import make_fake_qemu_tarball, sha256_file, write_fake_qemu_tree
from support.pipeline import cached_files, fake_project, tree_hashes


@pytest.fixture
def tarball(tmp_path):
    return make_fake_qemu_tarball(tmp_path / "dist")


def test_file_url_locks_on_first_use_then_mismatch_is_fatal(tmp_path, monkeypatch, kvmlab_env,
                                                            tarball, capsys):
    s, r = fake_project(tmp_path, monkeypatch, tarball=tarball)
    res = fetch_source(s, r)
    sha = sha256_file(tarball)
    assert (res.sha256, res.status, res.check) == (sha, "downloaded", "locked now")
    assert res.path == cache_path(s, sha, tarball.name) and sha256_file(res.path) == sha
    assert "no pinned sha256: recorded " + sha in capsys.readouterr().err.replace("\n", " ")
    lock = json.loads(s.lock.read_text())
    assert lock["sources"][f"{r.name}/{tarball.name}"]["sha256"] == sha
    assert json.loads(stamp_path(s, r).read_text())["record"]["sha256"] == sha
    assert fetch_source(s, r).status == "cached"
    # the mirror now serves another tarball under the same name: the lock catches it
    make_fake_qemu_tarball(tmp_path / "dist", kvm_version="qemu-kvm-0.12.1.2-evil")
    with pytest.raises(ChecksumError) as e:
        fetch_source(s, r, force=True)
    msg = e.value.message
    assert f"expected {sha} (locked)" in msg and sha256_file(tarball) in msg
    assert tarball.as_uri() in msg
    assert cached_files(s) == [f"{sha}/{tarball.name}"]  # only the good one, no .part


def test_pinned_mismatch_deletes_the_bytes(tmp_path, monkeypatch, kvmlab_env, tarball):
    s, r = fake_project(tmp_path, monkeypatch, tarball=tarball, sha256="0" * 64)
    with pytest.raises(ChecksumError, match=f"expected {'0' * 64} \\(pinned\\), got "):
        fetch_source(s, r)
    assert cached_files(s) == [] and not s.lock.exists()


def test_offline(tmp_path, monkeypatch, kvmlab_env, tarball):
    s, r = fake_project(tmp_path, monkeypatch, tarball=tarball, sha256=sha256_file(tarball))
    with pytest.raises(FetchError, match="offline: fake-qemu-0.12.1.2.tar.gz is not in the cache"):
        fetch_source(s, r, offline=True)
    fetch_source(s, r)
    tarball.unlink()  # the "network" is gone
    assert fetch_source(s, r, offline=True).status == "cached"


def test_offline_unknown_sha_without_lock(tmp_path, monkeypatch, kvmlab_env, tarball):
    s, r = fake_project(tmp_path, monkeypatch, tarball=tarball)
    with pytest.raises(FetchError, match="no pinned or locked sha256"):
        fetch_source(s, r, offline=True)


def test_corrupt_cache_is_refetched(tmp_path, monkeypatch, kvmlab_env, tarball, capsys):
    s, r = fake_project(tmp_path, monkeypatch, tarball=tarball)
    path = fetch_source(s, r).path
    path.write_bytes(b"bit rot")
    res = fetch_source(s, r)
    assert res.status == "downloaded" and sha256_file(path) == res.sha256
    assert "was corrupt" in capsys.readouterr().err


def test_bad_lock_file(tmp_path, monkeypatch, kvmlab_env, tarball):
    s, r = fake_project(tmp_path, monkeypatch, tarball=tarball)
    s.lock.write_text("{not json")
    with pytest.raises(FetchError, match="lock file .* is not valid JSON"):
        fetch_source(s, r)


def test_source_tarball_is_verified_and_cached(tmp_path, monkeypatch, kvmlab_env, tarball):
    s, r = fake_project(tmp_path, monkeypatch, tarball=tarball,
                        urls=["http://127.0.0.1:9/never-contacted.tar.gz"])
    res = fetch_source(s, r, source=tarball)
    assert (res.status, res.origin, res.check) == ("local", str(tarball), "locked now")
    assert fetch_source(s, r, offline=True).status == "cached"
    other = make_fake_qemu_tarball(tmp_path / "other", kvm_version="other")
    with pytest.raises(ChecksumError, match="expected .* \\(locked\\)"):
        fetch_source(s, r, source=other)


def test_source_directory_used_as_is(tmp_path, monkeypatch, kvmlab_env, tarball):
    s, r = fake_project(tmp_path, monkeypatch, tarball=tarball,
                        urls=["http://127.0.0.1:9/never-contacted.tar.gz"])
    tree = write_fake_qemu_tree(tmp_path / "checkout")
    p = prepare(s, r, "debian12", source=tree)
    assert p.source_sha256 == tree_sha256(tree) and p.fetched.kind == "dir"
    assert tree_hashes(p.src_dir) == tree_hashes(tree)
    assert not s.lock.exists()  # a directory is not the recipe's tarball: nothing locked
    assert prepare(s, r, "debian12", source=tree).noop
    (tree / "VERSION").write_text("changed\n")
    p2 = prepare(s, r, "debian12", source=tree)
    assert not p2.noop and (p2.src_dir / "VERSION").read_text() == "changed\n"


def test_missing_source_path(tmp_path, monkeypatch, kvmlab_env, tarball):
    s, r = fake_project(tmp_path, monkeypatch, tarball=tarball)
    with pytest.raises(FetchError, match="--source .*/nope: no such file or directory"):
        fetch_source(s, r, source=tmp_path / "nope")


# -- --source checked before anything is locked or cached -----------------------------------------

def _bad_sources(tmp_path):
    """name -> (a --source path a user might give by mistake, what the error must say)."""
    import gzip

    from support.pipeline import make_tar
    from support.rpmgen import write_rpm
    d = tmp_path / "bad"
    d.mkdir()
    (d / "empty.tar.gz").write_bytes(b"")
    (d / "emptydir").mkdir()
    (d / "notes.tar.gz").write_text("just some text, not an archive\n")
    (d / "page.tar.gz").write_bytes(gzip.compress(b"<html>404 Not Found</html>\n"))
    make_tar(d / "dirs-only.tar.gz", [("top/", "dir", ""), ("top/sub/", "dir", "")])
    make_tar(d / "flat.tar.gz", [("configure", "file", "x"), ("Makefile", "file", "x")])
    make_tar(d / "other-project.tar.gz", [("top/README", "file", "not qemu\n")])
    good = make_fake_qemu_tarball(tmp_path / "dist-for-bad").read_bytes()
    (d / "truncated.tar.gz").write_bytes(good[:len(good) // 2])
    (d / "readme-only").mkdir()
    (d / "readme-only" / "README").write_text("x\n")
    write_rpm(d / "binary.rpm", name="x", version="1", release="1",
              members=[("usr/bin/x", "x", 0o100755)], source=False)
    write_rpm(d / "nospec.src.rpm", name="x", version="1", release="1",
              members=[("x.tar.gz", "x", 0o100644)])
    return {
        "missing path": (d / "nope", "no such file or directory"),
        "empty file": (d / "empty.tar.gz", "is an empty file (0 bytes)"),
        "empty directory": (d / "emptydir", "is an empty directory"),
        "text file": (d / "notes.tar.gz", "is not an archive kvmlab can unpack"),
        "gzipped html page": (d / "page.tar.gz", "is not an archive kvmlab can unpack"),
        "archive with no files": (d / "dirs-only.tar.gz", "is an archive with no files"),
        "nothing after strip": (d / "flat.tar.gz", "no files left after stripping 1"),
        "another project's tarball": (d / "other-project.tar.gz",
                                      "does not look like a source tree of fake-qemu: no "
                                      "configure, Makefile at its top"),
        "truncated tarball": (d / "truncated.tar.gz", "is a damaged or truncated archive"),
        "directory of something else": (d / "readme-only", "does not look like a source tree"),
        "binary rpm": (d / "binary.rpm", "is a binary RPM, not a source RPM"),
        "srpm without spec": (d / "nospec.src.rpm", "is a source RPM without a .spec file"),
    }


BAD = ["missing path", "empty file", "empty directory", "text file", "gzipped html page",
       "archive with no files", "nothing after strip", "another project's tarball",
       "truncated tarball", "directory of something else", "binary rpm", "srpm without spec"]


@pytest.mark.parametrize("case", BAD)
def test_bad_source_is_refused_before_anything_is_locked(tmp_path, monkeypatch, kvmlab_env,
                                                         tarball, case):
    from kvmlab.core.errors import KvmlabError
    s, r = fake_project(tmp_path, monkeypatch, tarball=tarball)
    path, needle = _bad_sources(tmp_path)[case]
    for call in (lambda: fetch_source(s, r, source=path),
                 lambda: prepare(s, r, "debian12", source=path)):
        with pytest.raises(KvmlabError) as e:
            call()
        assert e.value.message.startswith(f"--source {path}") and needle in e.value.message
        assert e.value.hint and "\n" not in e.value.message
    assert not s.lock.exists() and cached_files(s) == []
    assert not stamp_path(s, r).exists() and not (s.work(r.name) / "src").exists()


def test_directory_one_level_too_high_gets_a_hint(tmp_path, monkeypatch, kvmlab_env, tarball):
    from kvmlab.core.errors import UnpackError
    s, r = fake_project(tmp_path, monkeypatch, tarball=tarball)
    tree = write_fake_qemu_tree(tmp_path / "unpacked" / "qemu-kvm-0.12.1.2")
    with pytest.raises(UnpackError) as e:
        fetch_source(s, r, source=tmp_path / "unpacked")
    assert f"did you mean {tree}?" in e.value.hint


def test_unreadable_source_is_refused_as_unreadable(tmp_path, monkeypatch, kvmlab_env, tarball):
    """Not "no such file": the path exists but this user may not read it (as root: the check
    runs in a child that dropped to nobody; pytest's tmp dirs are mode 0700)."""
    import os
    locked = tmp_path / "locked"
    locked.mkdir()
    src = locked / tarball.name
    src.write_bytes(tarball.read_bytes())
    s, r = fake_project(tmp_path, monkeypatch, tarball=tarball)
    locked.chmod(0)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report the error message through the pipe, never return to pytest
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            try:
                fetch_source(s, r, source=src)
                msg = "accepted"
            except Exception as e:  # noqa: BLE001 - reported to the parent
                msg = f"{type(e).__name__}: {getattr(e, 'message', e)}"
            os.write(wfd, msg.encode())
        finally:
            os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd) as f:
        msg = f.read()
    os.waitpid(pid, 0)
    locked.chmod(0o755)
    assert msg == f"FetchError: --source {src}: cannot read it: permission denied"
    assert not s.lock.exists() and cached_files(s) == []


def test_source_srpm_of_a_tar_recipe_is_accepted(tmp_path, monkeypatch, kvmlab_env, tarball):
    # a valid source RPM is an archive kvmlab unpacks: the check accepts it (what is inside is
    # the spec's business); it is hashed and locked like a tarball
    from support.rpmgen import write_srpm
    s, r = fake_project(tmp_path, monkeypatch, tarball=tarball)
    rpm = write_srpm(tmp_path / "x.src.rpm", "Name: x\n", {"x.tar.gz": tarball.read_bytes()})
    assert fetch_source(s, r, source=rpm).check == "locked now"


# -- --relock --------------------------------------------------------------------------------------

def test_relock_with_source_replaces_the_entry(tmp_path, monkeypatch, kvmlab_env, tarball):
    s, r = fake_project(tmp_path, monkeypatch, tarball=tarball,
                        urls=["http://127.0.0.1:9/never-contacted.tar.gz"])
    old = fetch_source(s, r, source=tarball).sha256
    other = make_fake_qemu_tarball(tmp_path / "other", kvm_version="re-rolled")
    with pytest.raises(ChecksumError) as e:
        fetch_source(s, r, source=other)
    assert f"--source {other} --relock" in e.value.hint and str(s.lock) in e.value.hint
    res = fetch_source(s, r, source=other, relock=True)
    assert (res.previous, res.sha256, res.check, res.status) == \
        (old, sha256_file(other), "relocked", "local")
    entry = json.loads(s.lock.read_text())["sources"][f"{r.name}/{tarball.name}"]
    assert entry["sha256"] == sha256_file(other) and entry["url"] == str(other)
    assert fetch_source(s, r, offline=True).sha256 == sha256_file(other)
    # relocking to the same bytes changes nothing in the lock
    before = s.lock.read_bytes()
    again = fetch_source(s, r, source=other, relock=True)
    assert again.previous == again.sha256 and s.lock.read_bytes() == before


def test_relock_refusals(tmp_path, monkeypatch, kvmlab_env, tarball):
    s, r = fake_project(tmp_path, monkeypatch, tarball=tarball)
    tree = write_fake_qemu_tree(tmp_path / "checkout")
    with pytest.raises(FetchError, match="is a directory; such sources are hashed on every use"):
        fetch_source(s, r, source=tree, relock=True)
    with pytest.raises(FetchError, match="--relock fetches the source again, which --offline"):
        fetch_source(s, r, offline=True, relock=True)
    assert not s.lock.exists()
    sp, rp = fake_project(tmp_path / "pinned", monkeypatch, tarball=tarball,
                          sha256=sha256_file(tarball))
    with pytest.raises(FetchError, match="never overrides a pin"):
        fetch_source(sp, rp, relock=True)


def test_relock_via_cli_shows_old_and_new(tmp_path, monkeypatch, kvmlab_env, tarball, cli):
    s, r = fake_project(tmp_path, monkeypatch, tarball=tarball)
    old = fetch_source(s, r).sha256
    other = make_fake_qemu_tarball(tmp_path / "other", kvm_version="re-rolled")
    res = cli("fetch", "--source", str(other), "--no-verify")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "--relock" in res.stderr.replace("\n", " ")
    res = cli("fetch", "--source", str(other), "--relock", "--no-verify")
    assert res.returncode == 0, res.stderr
    out = " ".join(res.stdout.split())
    assert f"entry {r.name}/{tarball.name} replaced (--relock) old {old} new " \
           f"{sha256_file(other)}" in out


def test_bad_source_via_cli_is_one_error_and_a_hint(tmp_path, monkeypatch, kvmlab_env, tarball,
                                                     cli):
    s, r = fake_project(tmp_path, monkeypatch, tarball=tarball)
    empty = tmp_path / "empty.tar.gz"
    empty.write_bytes(b"")
    res = cli("fetch", "--source", str(empty))
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert lines[0].startswith("error: --source ") and "is an empty file" in lines[0]
    assert lines[-1].lstrip().startswith("hint:")
    assert not s.lock.exists() and cached_files(s) == []
