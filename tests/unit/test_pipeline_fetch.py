"""fetch without a network: file:// URLs, --source, the lock, the cache, offline."""
import json

import pytest

from kvmlab.errors import ChecksumError, FetchError
from kvmlab.fetch import cache_path, fetch_source, stamp_path
from kvmlab.pipeline import prepare
from kvmlab.fsutil import tree_sha256
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
    assert json.loads(stamp_path(s, r).read_text())["sha256"] == sha
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
