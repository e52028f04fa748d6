"""A user's installer ISO: is it one, its El Torito boot entry, did its boot loader start.

``--iso PATH`` passes when the boot loader was loaded from the CD and started: (a) the serial
log shows a boot loader's banner (ISOLINUX, SYSLINUX, GRUB); or (b) the El Torito boot image
named by the ISO's boot catalog is in guest memory at its load address (read through the
monitor: ``xp /512xb 0x7c00``): the first 16 bytes identical and at least 90% of the first 512
(loaders keep a few variables in their first sector). SeaBIOS jumps to the image as soon as it
has loaded it, so (b) means the loader started.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from kvmlab.core.errors import VMError
from kvmlab.qemu.monitor import Monitor

LOADER_BANNERS = ("ISOLINUX", "SYSLINUX", "GNU GRUB", "GRUB loading", "Welcome to GRUB")


def check_iso(path: Path) -> None:
    """An ISO 9660 image: "CD001" in the primary volume descriptor at 0x8001."""
    try:
        with open(path, "rb") as f:
            f.seek(0x8001)
            magic = f.read(5)
    except OSError as e:
        raise VMError(f"cannot read ISO {path}: {e.strerror}") from None
    if magic != b"CD001":
        raise VMError(f"{path} is not an ISO 9660 image (no CD001 volume descriptor)",
                      hint="pass a bootable installer ISO")


@dataclass(frozen=True)
class ElTorito:
    load_address: int
    sectors: int
    image_lba: int
    head: bytes  # the first 512 bytes of the boot image


def read_el_torito(iso: Path) -> ElTorito:
    """The default BIOS boot entry of an ISO (ECMA-119 + El Torito); VMError if there is none."""
    try:
        with open(iso, "rb") as f:
            f.seek(17 * 2048)
            brvd = f.read(2048)
            if brvd[0:1] != b"\0" or brvd[1:6] != b"CD001" or \
                    not brvd[7:39].startswith(b"EL TORITO SPECIFICATION"):
                raise VMError(f"{iso} is not a BIOS-bootable CD image (no El Torito boot record)",
                              hint="an installer ISO for BIOS machines has one (e.g. isolinux)")
            cat_lba = int.from_bytes(brvd[0x47:0x4B], "little")
            f.seek(cat_lba * 2048)
            cat = f.read(64)
            entry = cat[32:64]
            if cat[0] != 1 or entry[0] != 0x88:
                raise VMError(f"{iso}: the El Torito default entry is not bootable")
            seg = int.from_bytes(entry[2:4], "little") or 0x07C0
            count = int.from_bytes(entry[6:8], "little")
            lba = int.from_bytes(entry[8:12], "little")
            f.seek(lba * 2048)
            head = f.read(512)
    except OSError as e:
        raise VMError(f"cannot read {iso}: {e.strerror}") from None
    return ElTorito(seg << 4, count, lba, head)


def memory_bytes(text: str) -> bytes:
    """The bytes of the monitor's ``xp /Nxb ADDR`` output ("ADDR: 0x.. 0x.. ..." lines)."""
    out = bytearray()
    for line in text.splitlines():
        if ":" in line:
            hexes = re.findall(r"0x([0-9a-fA-F]{2})\b", line.split(":", 1)[1])
            out += bytes(int(t, 16) for t in hexes)
    return bytes(out)


def loader_in_memory(mem: bytes, head: bytes) -> bool:
    """Check (b) of the module docstring."""
    n = min(len(mem), len(head))
    if n < 64 or mem[:16] != head[:16] or not any(head[:16]):
        return False
    same = sum(1 for a, b in zip(mem[:n], head[:n], strict=True) if a == b)
    return same >= 0.9 * n


def loader_evidence(mon: Monitor, serial: bytes, et: ElTorito) -> str:
    """What shows that the ISO's boot loader started ("" when nothing does, yet)."""
    text = serial.decode("latin-1")
    for b in LOADER_BANNERS:
        if b in text:
            return f"serial console shows the boot loader ({b!r})"
    try:
        mem = memory_bytes(mon.hmp(f"xp /512xb 0x{et.load_address:x}"))
    except (VMError, OSError, ValueError):
        return ""
    if loader_in_memory(mem, et.head):
        return (f"El Torito boot image (LBA {et.image_lba}) loaded at 0x{et.load_address:x} "
                "and started")
    return ""

