"""Unit tests of the vm step: boot sector, initramfs, size/info parsing, qemu flag choice."""
from __future__ import annotations

import gzip
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kvmlab.boot import bootsector, guest, image, iso, kernel, marker, vm
from kvmlab.core.errors import ImageError, VMError
from kvmlab.qemu import binary


def test_boot_sector_shape():
    s = bootsector.boot_sector()
    assert len(s) == 512
    assert s[510:] == b"\x55\xAA"
    code_end = s.rindex(b"Shutdown\x00") + 9
    assert code_end <= 446, "code must leave the partition table free"
    assert s.count(b"nonce=" + marker.NONCE_PLACEHOLDER) == 1
    assert b"\r\n" + marker.MARKER.encode() + b" nonce=" in s


def test_boot_sector_listing_matches_bytes():
    s = bootsector.boot_sector()
    for line in bootsector.boot_sector_listing().splitlines():
        addr, hexbytes = line[:4], line[6:26].strip()
        off = int(addr, 16) - 0x7C00
        b = bytes.fromhex(hexbytes.replace(" ", "")) if len(hexbytes) < 20 else None
        if b:
            assert s[off:off + len(b)] == b, line


@pytest.mark.skipif(not shutil.which("objdump"), reason="objdump (binutils) not installed")
def test_boot_sector_disassembles_to_the_documented_program(tmp_path):
    p = tmp_path / "bs.bin"
    p.write_bytes(bootsector.boot_sector())
    out = subprocess.run(["objdump", "-D", "-b", "binary", "-mi8086", "--adjust-vma=0x7c00",
                          str(p)],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    code = out.split("7c87:")[0]  # the message follows the code
    for needle in ("mov    $0x3f8,%dx", "mov    $0x8900,%dx", "mov    $0x80000b40,%eax",
                   "mov    $0x2000,%ax", "out    %ax,(%dx)", "hlt", "in     (%dx),%al"):
        assert needle in code, needle
    # every jump lands inside the code
    for target in re.findall(r"j\w+\s+0x([0-9a-f]+)", code):
        assert 0x7C00 <= int(target, 16) < 0x7C87


def test_patch_nonce(tmp_path):
    src = tmp_path / "a"
    src.write_bytes(b"junk XXXXXXXXXXXXXXXXXXXX KVMLAB-BOOT-OK nonce="
                    + marker.NONCE_PLACEHOLDER + b"\n")
    dst = tmp_path / "b"
    assert marker.patch_nonce(src, dst, "0123456789abcdef") == 1
    assert dst.read_bytes().endswith(b"nonce=0123456789abcdef\n")
    assert b"junk XXXXXXXXXXXXXXXXXXXX" in dst.read_bytes()  # only the placeholder after nonce=
    with pytest.raises(ValueError):
        marker.patch_nonce(src, dst, "short")
    (tmp_path / "c").write_bytes(b"nothing")
    with pytest.raises(VMError):
        marker.patch_nonce(tmp_path / "c", dst, "0123456789abcdef")


def _parse_newc(data: bytes) -> dict[str, tuple[int, bytes, int, int]]:
    files, pos = {}, 0
    while True:
        hdr = data[pos:pos + 110]
        assert hdr[:6] == b"070701"
        f = [int(hdr[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, nsize = f[1], f[6], f[9], f[10], f[11]
        name = data[pos + 110:pos + 110 + nsize - 1].decode()
        pos = (pos + 110 + nsize + 3) & ~3
        body = data[pos:pos + size]
        pos = (pos + size + 3) & ~3
        if name == "TRAILER!!!":
            return files
        files[name] = (mode, body, rmaj, rmin)


def test_initramfs_layout(tmp_path):
    bb = tmp_path / "busybox"
    bb.write_bytes(b"\x7fELF fake busybox")
    files = _parse_newc(kernel.make_initramfs("#!/bin/sh\necho hi\n", bb))
    assert files["init"][1] == b"#!/bin/sh\necho hi\n" and files["init"][0] & 0o111
    assert files["bin/busybox"][1] == bb.read_bytes()
    assert files["bin/sh"] == (0o120777, b"busybox", 0, 0)
    assert files["dev/console"][0] & 0o170000 == 0o020000 and files["dev/console"][2:] == (5, 1)
    for d in ("proc", "sys", "dev", "bin"):
        assert files[d][0] & 0o170000 == 0o040000
    # deterministic: same inputs, same bytes (the cache key relies on inputs only)
    assert kernel.make_initramfs("x", bb) == kernel.make_initramfs("x", bb)
    gz = kernel.make_initramfs("x", bb, compress=True)
    assert gzip.decompress(gz) == kernel.make_initramfs("x", bb)
    assert gz == kernel.make_initramfs("x", bb, compress=True)


@pytest.mark.skipif(not shutil.which("cpio"), reason="cpio not installed")
def test_initramfs_readable_by_cpio(tmp_path):
    bb = tmp_path / "busybox"
    bb.write_bytes(b"fake")
    listing = subprocess.run(["cpio", "-it"], input=kernel.make_initramfs("x", bb),
                             capture_output=True, check=True, timeout=30).stdout.decode()
    assert {"init", "bin/busybox", "dev/console", "bin/sh"} <= set(listing.split())


def test_default_init_prints_marker_and_facts():
    init = guest.DEFAULT_INIT
    assert "KVMLAB-BOOT-OK nonce=$nonce" in init and "kvmlab.nonce=" in init
    for fact in ("kernel=", "clocksource=", "hypervisor=", "cpus=", "mem_kb="):
        assert "KVMLAB-FACT " + fact in init
    assert "poweroff -f" in init
    assert "panic=-1" in guest.KERNEL_CMDLINE and "console=ttyS0" in guest.KERNEL_CMDLINE


@pytest.mark.parametrize("text,expected", [
    ("10G", 10 << 30), ("512M", 512 << 20), ("1048576", 1 << 20), ("4k", 4096), ("2GiB", 2 << 30),
])
def test_parse_size(text, expected):
    assert image.parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "ten", "-1G", "0", "1000"])
def test_parse_size_rejects(bad):
    with pytest.raises(ImageError):
        image.parse_size(bad)


def test_parse_info_text_old_and_new():
    old = ("image: vm.img\nfile format: qcow2\nvirtual size: 10G (10737418240 bytes)\n"
           "disk size: 136K\ncluster_size: 65536\n")
    new = ("image: vm.img\nfile format: qcow2\nvirtual size: 10 GiB (10737418240 bytes)\n"
           "disk size: 196 KiB\ncluster_size: 65536\nFormat specific information:\n    compat: 1.1\n")
    assert image.parse_info_text(old) == ("qcow2", 10737418240)
    assert image.parse_info_text(new) == ("qcow2", 10737418240)
    with pytest.raises(ImageError):
        image.parse_info_text("qemu-img: Could not open 'x'")


HELP_012 = """QEMU PC emulator version 0.12.1 (qemu-kvm-0.12.1.2), Copyright (c) 2003-2008 Fabrice Bellard
usage: qemu [options] [disk_image]
-M machine      select emulated machine (-M ? for list)
-hda/-hdb file  use 'file' as IDE hard disk 0/1 image
-drive [file=file][,if=type][,bus=n][,unit=m][,media=d][,index=i]
-nographic      disable graphical output and redirect serial I/Os to console
-serial dev     redirect the serial port to char device 'dev'
-monitor dev    redirect the monitor to char device 'dev'
-pidfile file   write PID to 'file'
-S              freeze CPU at startup (use 'c' to start execution)
-no-reboot      exit instead of rebooting
-enable-kvm     enable KVM full virtualization support
-readconfig <file>
                read/write config file-no-kvm         disable KVM hardware virtualization
-no-kvm-irqchip disable KVM kernel mode PIC/IOAPIC/LAPIC
"""
HELP_72 = """QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)
-machine [type=]name[,prop[=value][,...]]
                property accel=accel1[:accel2[:...]] selects accelerator
-accel [accel=]accelerator[,prop[=value][,...]]
-display none
                select display backend type
-serial dev     redirect the serial port to char device 'dev'
-qmp dev        like -monitor but opens in 'control' mode
-enable-kvm     enable KVM full virtualization support
"""


def test_flags_for_qemu_kvm_012():
    q = binary.QemuBinary(Path("/x"), "0.12.1 (qemu-kvm-0.12.1.2)", (0, 12, 1), HELP_012)
    assert q.qemu_kvm
    assert q.accel_args("tcg") == ["-no-kvm"]
    assert q.accel_args("kvm") == ["-enable-kvm"]
    assert q.display_args == ["-nographic"]
    assert not q.uses_qmp and q.socket_opts() == "server,nowait"


def test_flags_for_qemu_72():
    q = binary.QemuBinary(Path("/x"), "7.2.22", (7, 2, 22), HELP_72)
    assert q.accel_args("tcg") == ["-accel", "tcg"]
    assert q.accel_args("kvm") == ["-accel", "kvm"]
    assert q.display_args == ["-display", "none"]
    assert q.uses_qmp and q.socket_opts() == "server=on,wait=off"
    no_accel = binary.QemuBinary(Path("/x"), "2.0.0", (2, 0, 0),
                                 HELP_72.replace("-accel [", "-zzz ["))
    assert no_accel.accel_args("tcg") == ["-machine", "accel=tcg"]


def test_probe_rejects_non_qemu(tmp_path):
    with pytest.raises(VMError, match="not a qemu system emulator"):
        binary.probe_qemu("/bin/true")
    with pytest.raises(VMError, match="not found"):
        binary.probe_qemu(tmp_path / "nope")
    with pytest.raises(VMError, match="not an executable"):
        binary.probe_qemu(tmp_path)


def test_xp_output_and_loader_check():
    head = bytes(range(256)) * 2
    lines = [f"{0x7c00 + i:016x}: " + " ".join(f"0x{b:02x}" for b in head[i:i + 8])
             for i in range(0, 512, 8)]
    mem = iso.memory_bytes("\n".join(lines))
    assert mem == head
    assert iso.loader_in_memory(mem, head)
    changed = bytearray(head)
    changed[100:120] = bytes(20)  # a loader's variables: still the loader
    assert iso.loader_in_memory(bytes(changed), head)
    assert not iso.loader_in_memory(bytes(512), head)  # RAM still empty
    assert not iso.loader_in_memory(bytes(512), bytes(512))  # an all-zero "loader" proves nothing


def test_read_el_torito_rejects_non_iso(tmp_path):
    p = tmp_path / "x.iso"
    p.write_bytes(bytes(40 * 2048))
    with pytest.raises(VMError, match="El Torito"):
        iso.read_el_torito(p)


def test_parse_facts():
    f = marker.parse_facts("junk\r\nKVMLAB-FACT kernel=6.1.0\r\nKVMLAB-FACT clocksource=tsc\r\n")
    assert f == {"kernel": "6.1.0", "clocksource": "tsc"}


FAKE_012 = '''#!{python}
"""A stand-in for qemu-kvm 0.12 on a host where KVM init fails: it falls back silently."""
import socket, sys, time
args = sys.argv[1:]
if "-version" in args:
    print("QEMU PC emulator version 0.12.1 (qemu-kvm-0.12.1.2), Copyright (c) 2003-2008 Fabrice Bellard")
    sys.exit(0)
if "-help" in args:
    sys.stdout.write({help!r})
    sys.exit(0)
path = args[args.index("-monitor") + 1][len("unix:"):].split(",")[0]
sys.stderr.write("Create kernel PIC irqchip failed\\nCould not initialize KVM, will disable KVM support\\n")
sys.stderr.flush()
s = socket.socket(socket.AF_UNIX)
s.bind(path)
s.listen(1)
c, _ = s.accept()
c.sendall(b"QEMU 0.12.1 monitor - type 'help' for more information\\r\\n(qemu) ")
for line in c.makefile("rb"):
    cmd = line.strip().decode()
    out = "\\x1b[K" + cmd + "\\r\\n"  # the monitor echoes the command line
    if cmd == "info kvm":
        out += "kvm support: disabled\\r\\n"
    c.sendall(out.encode() + b"(qemu) ")
    if cmd == "cont":
        break
time.sleep(1000)
'''


@pytest.fixture
def fake_012(tmp_path):
    import sys
    p = tmp_path / "qemu-system-x86_64"
    p.write_text(FAKE_012.format(python=sys.executable, help=HELP_012))
    p.chmod(0o755)
    return p


def _alive(name: str) -> bool:
    import os
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if name.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:
            pass
    return False


def test_silent_kvm_fallback_is_caught_by_the_monitor(kvmlab_env, fake_012, monkeypatch):
    """--accel kvm: the command line asked for KVM, the monitor says disabled -> VMError."""
    monkeypatch.setattr(vm, "choose_accel", lambda accel: ("kvm", "--accel kvm"))
    with pytest.raises(VMError, match="not using KVM") as e:
        vm.boot_test(kvmlab_env, qemu=fake_012, accel="kvm", guest="tiny", timeout=20)
    assert "Could not initialize KVM" in e.value.message
    runs = list((kvmlab_env.state_dir / "vm" / "runs").iterdir())
    assert len(runs) == 1
    cmd = (runs[0] / "command.txt").read_text()
    assert "-enable-kvm" in cmd and "-nographic" in cmd and "server,nowait" in cmd
    assert not _alive(runs[0].name.split("-")[-1])


def test_auto_reports_fallback_and_times_out(kvmlab_env, fake_012, monkeypatch):
    """auto picked KVM but qemu fell back: reported as tcg; no marker -> timeout, qemu killed."""
    monkeypatch.setattr(vm, "choose_accel", lambda accel: ("kvm", "auto: probe says usable"))
    r = vm.boot_test(kvmlab_env, qemu=fake_012, accel="auto", guest="tiny", timeout=1.5)
    assert r.accel == "tcg" and "fell back" in r.accel_reason
    assert not r.booted and r.failure.startswith("timeout")
    assert "Could not initialize KVM, will disable KVM support" in r.warnings
    assert not _alive(r.name)


def test_free_space_is_checked_before_anything_is_written(tmp_path, monkeypatch):
    from collections import namedtuple
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(image.shutil, "disk_usage", lambda p: Usage(10 << 30, 0, 1 << 20))
    with pytest.raises(ImageError, match="not enough free space"):
        image.create_image(tmp_path / "big.raw", "1G", "raw", qemu_img="/bin/false")
    with pytest.raises(ImageError, match="not enough free space"):
        image.create_image(tmp_path / "x.qcow2", "1G", "qcow2", qemu_img="/bin/false")
    assert list(tmp_path.iterdir()) == []


def test_create_image_cleans_up_when_qemu_img_fails(tmp_path):
    with pytest.raises(ImageError, match="qemu-img create failed"):
        image.create_image(tmp_path / "vm.img", "1G", qemu_img="/bin/false")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ImageError, match="unsupported image format"):
        image.create_image(tmp_path / "vm.img", "1G", "vmdk")


def test_qcow2_version_from_header(tmp_path):
    p = tmp_path / "a"
    p.write_bytes(b"QFI\xfb\x00\x00\x00\x03" + bytes(100))
    assert image.qcow2_version(p) == 3
    p.write_bytes(b"QFI\xfb\x00\x00\x00\x02")
    assert image.qcow2_version(p) == 2
    p.write_bytes(bytes(512))
    assert image.qcow2_version(p) is None
