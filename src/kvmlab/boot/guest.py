"""Test guests, made from nothing but this file and the host's packages, cached by input hash.

Kinds (each cached under ``settings.cache/guests/<kind>-<hash>/``):

``tiny``
    A 512-byte MBR boot sector (x86 real-mode code assembled below, instruction by instruction) on
    a 64 KiB raw disk. It programs COM1, prints ``KVMLAB-BOOT-OK nonce=<16 hex>`` and powers the
    machine off: first through the Bochs/QEMU ``Shutdown`` port 0x8900 (qemu-kvm 0.12 has it),
    then through ACPI PM1a_CNT of the PIIX4 power-management function (``-M pc``), then halts.
    The nonce is a placeholder of 16 ``X`` in the cached image, patched into a per-run copy.
``linux``
    A kernel (``/boot/vmlinuz-*`` or ``kernel=``; also extracted to an uncompressed PVH vmlinux
    when possible, for qemu >= 4.0) plus a newc initramfs written here from
    busybox-static with an /init that prints the marker (the nonce comes on the kernel command
    line as ``kvmlab.nonce=``) and ``KVMLAB-FACT key=value`` lines (kernel, clocksource,
    hypervisor CPUID flag, CPUs, memory), then ``poweroff -f``.
``iso``
    The linux guest on a BIOS-bootable ISO made by grub-mkrescue (serial console, timeout 0). The
    kernel command line in grub.cfg holds the nonce placeholder; a per-run copy is patched.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmlab.boot.bootsector import boot_sector, boot_sector_listing
from kvmlab.boot.kernel import extract_vmlinux, find_busybox, find_kernel, make_initramfs
from kvmlab.boot.marker import NONCE_PLACEHOLDER
from kvmlab.core import proc
from kvmlab.core.errors import VMError
from kvmlab.core.fsutil import json_sha256
from kvmlab.core.settings import Settings
from kvmlab.core.stamps import Stamp

KINDS = ("tiny", "linux", "iso")
GUEST_FORMAT_VERSION = 3  # bump when the way guests are made changes (invalidates the cache)
FILE_KEYS = ("disk", "kernel", "vmlinux", "initrd", "iso")
GRUB_DIR = Path("/usr/lib/grub/i386-pc")
GRUB_VERSION_TIMEOUT = 30

# What the tool puts on the kernel command line. Each item cuts boot time or makes a failure end:
#   console=ttyS0      the marker and facts go to the serial port that is logged
#   panic=-1           reboot at once on panic; qemu's -no-reboot turns that into an exit
#   quiet              no kernel log on the (slow, emulated) serial console
#   lpj=               skip calibrating the delay loop (a visible pause under TCG)
#   no_timer_check     skip the IO-APIC timer check (slow and flaky under TCG)
#   tsc=reliable       no TSC watchdog against other clocks
#   mitigations=off    no speculative-execution workarounds in a throwaway test guest
#   8250.nr_uarts=1    do not probe four legacy UARTs
#   cryptomgr.notests  skip the crypto self-tests (~0.7-1.4 s of a TCG boot, bench/boot.py)
KERNEL_CMDLINE = ("console=ttyS0 panic=-1 quiet lpj=10000000 no_timer_check tsc=reliable "
                  "mitigations=off 8250.nr_uarts=1 cryptomgr.notests")

DEFAULT_INIT = r"""#!/bin/sh
# kvmlab test guest: prove the kernel booted and report what it sees, then power off.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
nonce=none
for w in $(cat /proc/cmdline); do
  case "$w" in kvmlab.nonce=*) nonce="${w#kvmlab.nonce=}" ;; esac
done
cs=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource 2>/dev/null)
if grep -qw hypervisor /proc/cpuinfo; then hv=yes; else hv=no; fi
mem=$(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo)
up=$(cut -d' ' -f1 /proc/uptime)
echo "KVMLAB-FACT kernel=$(uname -r)"
echo "KVMLAB-FACT clocksource=$cs"
echo "KVMLAB-FACT hypervisor=$hv"
echo "KVMLAB-FACT cpus=$(nproc)"
echo "KVMLAB-FACT mem_kb=$mem"
echo "KVMLAB-FACT uptime=$up"
echo "KVMLAB-BOOT-OK nonce=$nonce"
poweroff -f
reboot -f
"""

@dataclass(frozen=True)
class Guest:
    kind: str
    dir: Path
    disk: Path | None = None      # tiny: the raw boot disk (with placeholder)
    kernel: Path | None = None    # linux: the bzImage
    vmlinux: Path | None = None   # linux: the same kernel uncompressed (PVH ELF), if extractable
    initrd: Path | None = None    # linux
    iso: Path | None = None       # iso
    cmdline: str = ""             # linux/iso: kernel command line without the nonce
    cached: bool = False
    inputs: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# The cache: settings.cache/guests/<kind>-<hash>/, its guest.json a kvmlab.core.stamps.Stamp
# --------------------------------------------------------------------------------------------

def _file_id(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _guest_dir(settings: Settings, kind: str, inputs: dict[str, Any]) -> Path:
    return settings.cache / "guests" / f"{kind}-{json_sha256(inputs)[:16]}"


def _stamp(final: Path, kind: str) -> Stamp:
    return Stamp(final / "guest.json", f"guest-{kind}")


def _load(final: Path, kind: str, inputs: dict[str, Any]) -> Guest | None:
    """The guest in ``final`` when it was made from ``inputs`` and all its files are there."""
    rec = _stamp(final, kind).fresh(inputs)
    if not isinstance(rec, dict):
        return None
    paths = {k: (final / rec[k] if rec.get(k) else None) for k in FILE_KEYS}
    if not all(p.exists() for p in paths.values() if p):
        return None
    return Guest(kind, final, cmdline=str(rec.get("cmdline", "")), cached=True, inputs=inputs,
                 **paths)


def _publish(tmp: Path, final: Path, kind: str) -> None:
    """Move a finished temp dir into place (a concurrent builder may have won: keep theirs)."""
    os.chmod(tmp, 0o755)
    try:
        os.rename(tmp, final)
    except OSError:
        if _stamp(final, kind).read() is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise


def _cached(settings: Settings, kind: str, inputs: dict[str, Any], force: bool,
            make: Callable[[Path], dict[str, str]], build: bool = True) -> Guest:
    """The cached guest for ``inputs``, or one made by ``make(tmp_dir)`` (which writes its files
    there and returns {"disk"/"kernel"/...: file name, "cmdline": ...}), published atomically.
    ``build=False`` (a dry run): the cached one or VMError, nothing is made."""
    final = _guest_dir(settings, kind, inputs)
    if not force and (g := _load(final, kind, inputs)):
        return g
    if not build:
        raise VMError(f"the {kind} test guest is not in the cache yet ({final})",
                      hint=f"`invoke guest --kind {kind}` makes it; a dry run writes nothing")
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(final, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=final.parent))
    try:
        record = make(tmp)
        _stamp(tmp, kind).write(inputs, record)
        _publish(tmp, final, kind)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    g = _load(final, kind, inputs)
    assert g is not None
    return dataclasses.replace(g, cached=False)


# --------------------------------------------------------------------------------------------
# The three kinds
# --------------------------------------------------------------------------------------------

def make_tiny(settings: Settings, force: bool = False, build: bool = True) -> Guest:
    sector = boot_sector()
    inputs = {"kind": "tiny", "v": GUEST_FORMAT_VERSION,
              "sector": hashlib.sha256(sector).hexdigest()}

    def make(tmp: Path) -> dict[str, str]:
        # 64 KiB raw disk: the boot sector, then zeros (SeaBIOS wants more than one sector)
        (tmp / "disk.raw").write_bytes(sector + bytes(64 * 1024 - 512))
        (tmp / "bootsector.lst").write_text(boot_sector_listing() + "\n")
        return {"disk": "disk.raw"}
    return _cached(settings, "tiny", inputs, force, make, build)


def make_linux(settings: Settings, kernel: str | Path | None = None, init_script: str | None = None,
               force: bool = False, build: bool = True) -> Guest:
    k = find_kernel(kernel)
    bb = find_busybox()
    init = init_script if init_script is not None else DEFAULT_INIT
    inputs = {"kind": "linux", "v": GUEST_FORMAT_VERSION, "kernel": _file_id(k),
              "busybox": _file_id(bb), "init": hashlib.sha256(init.encode()).hexdigest(),
              "cmdline": KERNEL_CMDLINE}

    def make(tmp: Path) -> dict[str, str]:
        shutil.copyfile(k, tmp / "vmlinuz")
        (tmp / "initrd.cpio").write_bytes(make_initramfs(init, bb))
        (tmp / "init").write_text(init)
        files = {"kernel": "vmlinuz", "initrd": "initrd.cpio", "cmdline": KERNEL_CMDLINE}
        elf = extract_vmlinux(k)
        if elf:
            (tmp / "vmlinux").write_bytes(elf)
            files["vmlinux"] = "vmlinux"
        return files
    return _cached(settings, "linux", inputs, force, make, build)


GRUB_CFG = """\
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=0
set default=0
menuentry "kvmlab test guest" {{
  linux /boot/vmlinuz {cmdline} kvmlab.nonce={placeholder}
  initrd /boot/initrd.cpio
}}
"""


def _grub_mkrescue() -> str:
    """grub-mkrescue with BIOS support and the tools it needs; VMError naming what is missing."""
    mkrescue = shutil.which("grub-mkrescue")
    if not mkrescue or not GRUB_DIR.is_dir():
        raise VMError("grub-mkrescue with BIOS (i386-pc) support is not installed",
                      hint="apt-get install grub-common grub-pc-bin xorriso mtools")
    for tool in ("xorriso", "mformat"):
        if not shutil.which(tool):
            raise VMError(f"{tool} is not installed (grub-mkrescue needs it)",
                          hint="apt-get install xorriso mtools")
    return mkrescue


def make_iso(settings: Settings, kernel: str | Path | None = None, init_script: str | None = None,
             force: bool = False, timeout: float = 300, build: bool = True) -> Guest:
    lin = make_linux(settings, kernel, init_script, build=build)
    bzimage, initrd = lin.kernel, lin.initrd
    assert bzimage is not None and initrd is not None
    mkrescue = _grub_mkrescue()
    cfg = GRUB_CFG.format(cmdline=KERNEL_CMDLINE, placeholder=NONCE_PLACEHOLDER.decode())
    grub_ver = proc.run([mkrescue, "--version"], timeout=GRUB_VERSION_TIMEOUT).stdout.strip()
    inputs = {"kind": "iso", "v": GUEST_FORMAT_VERSION, "linux": lin.inputs, "grub_cfg": cfg,
              "grub": grub_ver}

    def make(tmp: Path) -> dict[str, str]:
        root = tmp / "root"
        (root / "boot" / "grub").mkdir(parents=True)
        shutil.copyfile(bzimage, root / "boot" / "vmlinuz")
        shutil.copyfile(initrd, root / "boot" / "initrd.cpio")
        (root / "boot" / "grub" / "grub.cfg").write_text(cfg)
        # BIOS only (i386-pc), few modules: a small, quick image
        cmd = [mkrescue, "-o", str(tmp / "guest.iso"), "-d", str(GRUB_DIR),
               "--install-modules=linux normal iso9660 biosdisk serial terminal echo test",
               "--fonts=", "--locales=", "--themes=", str(root)]
        r = proc.run(cmd, timeout=timeout, env={**os.environ, "SOURCE_DATE_EPOCH": "0"})
        if r.returncode != 0 or not (tmp / "guest.iso").exists():
            raise VMError("grub-mkrescue failed: " + (r.stderr.strip().splitlines() or ["?"])[-1],
                          hint="command: " + " ".join(cmd))
        shutil.rmtree(root)
        if (tmp / "guest.iso").read_bytes().count(b"kvmlab.nonce=" + NONCE_PLACEHOLDER) < 1:
            raise VMError("the ISO does not contain grub.cfg's nonce placeholder in plain text")
        return {"iso": "guest.iso", "cmdline": KERNEL_CMDLINE}
    return _cached(settings, "iso", inputs, force, make, build)


def make_guest(settings: Settings, kind: str, *, kernel: str | Path | None = None,
               init_script: str | None = None, force: bool = False, build: bool = True) -> Guest:
    if kind == "tiny":
        return make_tiny(settings, force=force, build=build)
    if kind == "linux":
        return make_linux(settings, kernel, init_script, force=force, build=build)
    if kind == "iso":
        return make_iso(settings, kernel, init_script, force=force, build=build)
    raise VMError(f"unknown guest kind {kind!r}", hint="use one of " + ", ".join(KINDS))
