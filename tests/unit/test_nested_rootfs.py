"""The lab VM's rootfs pieces: the module closure from modules.dep and the newc cpio writer
(read back, and — when `cpio` is installed — unpacked by GNU cpio itself)."""
from __future__ import annotations

import io
import shutil
import stat
import subprocess
import tarfile

import pytest

from kvmlab.nested.cpio import CpioWriter, read_newc
from kvmlab.nested.rootfs import RootfsError, module_closure, module_name, write_rootfs

# the relevant lines of 6.1.0-50-amd64's modules.dep
DEP = """\
kernel/arch/x86/kvm/kvm.ko: kernel/virt/lib/irqbypass.ko
kernel/arch/x86/kvm/kvm-intel.ko: kernel/arch/x86/kvm/kvm.ko kernel/virt/lib/irqbypass.ko
kernel/arch/x86/kvm/kvm-amd.ko: kernel/drivers/crypto/ccp/ccp.ko kernel/arch/x86/kvm/kvm.ko kernel/virt/lib/irqbypass.ko
kernel/drivers/crypto/ccp/ccp.ko:
kernel/virt/lib/irqbypass.ko:
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko
"""


def test_module_names_are_what_modprobe_uses():
    assert module_name("kernel/arch/x86/kvm/kvm-amd.ko") == "kvm_amd"
    assert module_name("kernel/arch/x86/kvm/kvm-intel.ko.xz") == "kvm_intel"


def test_closure_holds_the_modules_and_their_dependencies_only():
    got = module_closure(DEP, ["kvm-amd", "virtio_net"])
    assert got == sorted([
        "kernel/arch/x86/kvm/kvm-amd.ko", "kernel/arch/x86/kvm/kvm.ko",
        "kernel/drivers/crypto/ccp/ccp.ko", "kernel/virt/lib/irqbypass.ko",
        "kernel/drivers/net/virtio_net.ko", "kernel/drivers/net/net_failover.ko",
        "kernel/net/core/failover.ko", "kernel/drivers/virtio/virtio_ring.ko",
        "kernel/drivers/virtio/virtio.ko"])
    assert not any("ext4" in p or "intel" in p for p in got)


def test_closure_of_a_module_the_kernel_lacks_is_one_clear_error():
    with pytest.raises(RootfsError, match="vhost_net is not in this kernel's modules.dep"):
        module_closure(DEP, ["kvm", "vhost_net"])


def _sample(w: CpioWriter) -> None:
    w.add_dir("etc")
    w.add_file("etc/hello", b"hello\n", 0o640, mtime=1234)
    w.add_file("odd", b"12345", 0o755)
    w.add_symlink("lib", "usr/lib")
    w.add_node("console", stat.S_IFCHR | 0o600, (5, 1))
    w.close()


def test_cpio_writer_round_trip():
    buf = io.BytesIO()
    _sample(CpioWriter(buf))
    assert len(buf.getvalue()) % 4 == 0
    entries = {e.name: e for e in read_newc(buf.getvalue())}
    assert list(entries) == ["etc", "etc/hello", "odd", "lib", "console"]
    assert stat.S_ISDIR(entries["etc"].mode)
    assert entries["etc/hello"].data == b"hello\n" and entries["etc/hello"].mode & 0o7777 == 0o640
    assert entries["etc/hello"].mtime == 1234
    assert entries["odd"].data == b"12345"
    assert stat.S_ISLNK(entries["lib"].mode) and entries["lib"].data == b"usr/lib"
    assert stat.S_ISCHR(entries["console"].mode) and entries["console"].rdev == (5, 1)


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio is not installed")
def test_gnu_cpio_reads_what_we_write(tmp_path):
    buf = io.BytesIO()
    _sample(CpioWriter(buf))
    listing = subprocess.run(["cpio", "-t", "-v", "-H", "newc"], input=buf.getvalue(),
                             capture_output=True, check=True).stdout.decode()
    for name in ("etc/hello", "odd", "lib -> usr/lib", "console"):
        assert name in listing, listing


def _tar(path, members):
    with tarfile.open(path, "w") as t:
        for name, kind, data in members:
            ti = tarfile.TarInfo(name)
            if kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                t.addfile(ti)
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, data
                t.addfile(ti)
            elif kind == "link":
                ti.type, ti.linkname = tarfile.LNKTYPE, data
                t.addfile(ti)
            else:
                ti.size, ti.mode = len(data), 0o755
                t.addfile(ti, io.BytesIO(data))


def test_rootfs_has_the_image_files_modules_under_usr_lib_extras_and_our_init(tmp_path):
    fs = tmp_path / "fs.tar"
    _tar(fs, [("usr", "dir", None), ("usr/lib", "dir", None), ("lib", "sym", "usr/lib"),
              ("usr/bin", "dir", None), ("usr/bin/perl", "file", b"#!perl\n"),
              ("usr/bin/perl5.36", "link", "usr/bin/perl"), (".dockerenv", "file", b""),
              ("init", "file", b"not ours")])
    mods = tmp_path / "mods" / "lib" / "modules" / "6.1.0-50-amd64" / "kernel"
    mods.mkdir(parents=True)
    (mods / "kvm.ko").write_bytes(b"\x7fELF")
    extra = tmp_path / "bundle.tar"
    extra.write_bytes(b"bundle")
    out = tmp_path / "root.cpio"
    write_rootfs(out, fs, tmp_path / "mods", b"#!/bin/sh\necho ours\n",
                 {"/opt/kvmlab/b.tar": extra})
    e = {x.name: x for x in read_newc(out.read_bytes())}
    assert e["usr/bin/perl5.36"].data == b"#!perl\n"          # a hard link becomes a copy
    assert e["usr/lib/modules/6.1.0-50-amd64/kernel/kvm.ko"].data == b"\x7fELF"
    assert "lib/modules" not in e                                # /lib is the image's symlink
    assert e["opt/kvmlab/b.tar"].data == b"bundle" and stat.S_ISDIR(e["opt/kvmlab"].mode)
    assert e["init"].data == b"#!/bin/sh\necho ours\n" and e["init"].mode & 0o111
    assert ".dockerenv" not in e
