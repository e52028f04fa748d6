"""unpack: safe extraction (data filter and the by-hand fallback for Python < 3.11.4), strip;
and prepare() keeps the old tree when a new source is refused."""
import os

import pytest

from kvmlab.core.errors import UnpackError
from kvmlab.source import tar as unpack_mod
from kvmlab.source.prepare import prepare
from kvmlab.source.unpack import extract
from support.fakeqemu import make_fake_qemu_tarball, write_fake_qemu_tree
from support.pipeline import fake_project, make_tar, tree_hashes


@pytest.fixture(params=["data-filter", "by-hand"])
def filter_impl(request, monkeypatch):
    if request.param == "data-filter" and unpack_mod._DATA_FILTER is None:
        pytest.skip("this Python's tarfile has no data filter (< 3.11.4)")
    if request.param == "by-hand":
        monkeypatch.setattr(unpack_mod, "_DATA_FILTER", None)
    return request.param


def test_strips_top_dir_keeps_exec_bits(tmp_path, filter_impl):
    dest = tmp_path / "work" / "src"
    extract(make_fake_qemu_tarball(tmp_path / "dist"), "tarball", dest, strip=1)
    assert (dest / "configure").is_file() and os.access(dest / "configure", os.X_OK)
    assert (dest / "pc-bios" / "bios.bin").stat().st_size == 128 * 1024


@pytest.mark.parametrize("members,needle", [
    ([("top/", "dir", ""), ("top/../../evil", "file", "x")], "top/../../evil"),
    ([("top/ok", "file", "x"), ("/etc/evil", "file", "x")], "/etc/evil"),
    ([("top/", "dir", ""), ("top/link", "symlink", "../../../etc/passwd")], "top/link"),
    ([("top/", "dir", ""), ("top/abs", "symlink", "/etc/passwd")], "top/abs"),
    ([("top/", "dir", ""), ("top/hard", "hardlink", "../etc/passwd")], "../etc/passwd"),
])
def test_refuses_unsafe_members(tmp_path, filter_impl, members, needle):
    bad = make_tar(tmp_path / "bad.tar.gz", members)
    dest = tmp_path / "a" / "b" / "src"
    dest.parent.mkdir(parents=True)
    with pytest.raises(UnpackError) as e:
        extract(bad, "tarball", dest, strip=1)
    assert needle in e.value.message and "refusing" in e.value.message
    outside = [p for p in tmp_path.rglob("*") if dest not in p.parents and p != dest]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in outside) == ["a", "a/b", "bad.tar.gz"]


def test_refused_source_keeps_the_old_tree(tmp_path, monkeypatch, kvmlab_env):
    s, r = fake_project(tmp_path, monkeypatch, urls=["http://127.0.0.1:9/never.tar.gz"])
    good = prepare(s, r, "debian12", source=write_fake_qemu_tree(tmp_path / "checkout"))
    before = tree_hashes(good.src_dir)
    bad = make_tar(tmp_path / "bad.tar.gz", [("top/", "dir", ""), ("top/../../x", "file", "x")])
    with pytest.raises(UnpackError):
        prepare(s, r, "debian12", source=bad)
    assert tree_hashes(good.src_dir) == before
    assert sorted(p.name for p in good.src_dir.parent.iterdir()) == ["fetch.json", "patch.json",
                                                                      "src"]


def test_safe_links_inside_the_tree_are_kept(tmp_path, filter_impl):
    tb = make_tar(tmp_path / "ok.tar.gz", [
        ("top/", "dir", ""), ("top/a", "file", "A"), ("top/sub/", "dir", ""),
        ("top/sub/l", "symlink", "../a"), ("top/h", "hardlink", "top/a")])
    dest = tmp_path / "src"
    extract(tb, "tarball", dest)
    assert (dest / "sub" / "l").read_text() == "A" and os.readlink(dest / "sub" / "l") == "../a"
    assert (dest / "h").read_text() == "A"


def test_nothing_left_after_strip_is_an_error(tmp_path):
    tb = make_tar(tmp_path / "flat.tar.gz", [("file-at-top", "file", "x")])
    with pytest.raises(UnpackError, match="strip_components"):
        extract(tb, "tarball", tmp_path / "src", strip=1)


def test_not_a_tarball(tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tar" * 100)
    with pytest.raises(UnpackError, match="cannot unpack"):
        extract(junk, "tarball", tmp_path / "src")


def test_directory_source_is_copied_as_is(tmp_path):
    tree = write_fake_qemu_tree(tmp_path / "mytree")
    (tree / "link").symlink_to("VERSION")
    extract(tree, "dir", tmp_path / "work" / "src")
    assert tree_hashes(tmp_path / "work" / "src") == tree_hashes(tree)
