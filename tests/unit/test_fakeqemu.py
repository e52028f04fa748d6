"""The generated fake tree behaves like qemu-kvm 0.12 where kvmlab depends on it."""
import shutil
import subprocess

import pytest

from support.fakeqemu import (
    build_fake_qemu_native,
    make_fake_qemu_tarball,
    sha256_file,
    write_fake_qemu_tree,
)

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this host")


def run(*a, **kw):
    return subprocess.run([str(x) for x in a], capture_output=True, text=True, timeout=20, **kw)


def test_tarball_is_reproducible(tmp_path):
    assert sha256_file(make_fake_qemu_tarball(tmp_path / "a")) == \
        sha256_file(make_fake_qemu_tarball(tmp_path / "b"))


def test_firmware_lookup_like_0_12(tmp_path):
    src = build_fake_qemu_native(write_fake_qemu_tree(tmp_path / "src"), prefix=str(tmp_path / "nowhere"))
    binary = src / "x86_64-softmmu" / "qemu-system-x86_64"
    assert "0.12.1 (qemu-kvm-0.12.1.2-fake)" in run(binary, "-version").stdout
    # from the build tree: <build>/pc-bios is found
    r = run(binary, "-S", "-monitor", "stdio", input="quit\n")
    assert r.returncode == 0 and "could not load PC BIOS" not in r.stderr
    # copied alone into PREFIX/bin: dies like the real one
    prefix = tmp_path / "prefix"
    (prefix / "bin").mkdir(parents=True)
    shutil.copy2(binary, prefix / "bin")
    r = run(prefix / "bin" / "qemu-system-x86_64", "-S", "-monitor", "stdio", input="quit\n")
    assert r.returncode == 1 and "could not load PC BIOS 'bios.bin'" in r.stderr
    # only bios.bin in PREFIX/share/qemu: boots with the vapic warning (the half-fixed state)
    (prefix / "share" / "qemu").mkdir(parents=True)
    shutil.copy2(src / "pc-bios" / "bios.bin", prefix / "share" / "qemu")
    r = run(prefix / "bin" / "qemu-system-x86_64", "-S", "-monitor", "stdio", input="quit\n")
    assert r.returncode == 0 and "Could not open option rom 'vapic.bin'" in r.stderr
    # -L wins
    r = run(prefix / "bin" / "qemu-system-x86_64", "-L", tmp_path / "empty", "-S", "-monitor", "stdio",
            input="quit\n")
    assert r.returncode == 1
