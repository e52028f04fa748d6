"""The linux guest's parts: find and check a kernel, its PVH vmlinux, a busybox initramfs.

``find_kernel`` picks ``kernel=`` or the newest ``/boot/vmlinuz-*``; ``extract_vmlinux`` unpacks
the uncompressed ELF kernel of a bzImage when qemu (>= 4.0) can boot it through PVH, which skips
the in-guest decompression; ``make_initramfs`` writes a newc cpio from busybox-static and an
/init script (same inputs, same bytes).
"""
from __future__ import annotations

import glob
import gzip
import io
import lzma
import os
import re
import shutil
import struct
import zlib
from pathlib import Path

from kvmlab.core import proc
from kvmlab.core.errors import KvmlabError, VMError

FILE_TIMEOUT = 10


def check_kernel(path: Path) -> None:
    """A bzImage (x86 boot protocol: "HdrS" at 0x202) or an ELF vmlinux; else a clear error."""
    try:
        with open(path, "rb") as f:
            head = f.read(0x206)
    except OSError as e:
        raise VMError(f"cannot read kernel {path}: {e.strerror}") from None
    if head[0x202:0x206] != b"HdrS" and head[:4] != b"\x7fELF":
        what = "an empty file" if not head else "neither a bzImage nor an ELF vmlinux"
        raise VMError(f"{path} is not a Linux kernel image ({what})",
                      hint="pass a bzImage such as /boot/vmlinuz-<release>")


def find_kernel(kernel: str | Path | None = None) -> Path:
    if kernel:
        p = Path(kernel).expanduser()
        if not p.is_file():
            raise VMError(f"kernel not found: {p}", hint="pass the path of a bzImage")
        check_kernel(p)
        return p.resolve()
    found = sorted(glob.glob("/boot/vmlinuz-*"), key=_version_key)
    if not found:
        raise VMError("no kernel in /boot (no /boot/vmlinuz-*)",
                      hint="apt-get install linux-image-amd64, or pass --kernel PATH")
    p = Path(found[-1])
    if not os.access(p, os.R_OK):
        raise VMError(f"{p} is not readable", hint="run as root or pass --kernel PATH")
    return p


def _version_key(path: str) -> list:
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", path)]


def find_busybox() -> Path:
    for c in ("/bin/busybox", "/usr/bin/busybox"):
        p = Path(c)
        if p.is_file() and "dynamically linked" not in _file_type(p):
            return p
    raise VMError("no static busybox found", hint="apt-get install busybox-static")


def _file_type(p: Path) -> str:
    """What `file -b` says about ``p``; "" when there is no `file` or it does not answer."""
    if not shutil.which("file"):
        return ""
    try:
        return proc.run(["file", "-b", p], timeout=FILE_TIMEOUT).stdout
    except (OSError, KvmlabError):
        return ""


def _cpio_newc(entries: list[tuple[str, int, bytes, int, int]]) -> bytes:
    """A newc cpio archive. entries: (name, mode, data, rdevmajor, rdevminor)."""
    out = io.BytesIO()

    def pad(n: int) -> None:
        out.write(b"\0" * ((4 - n % 4) % 4))

    ino = 1
    for name, mode, data, rmaj, rmin in entries + [("TRAILER!!!", 0, b"", 0, 0)]:
        nb = name.encode() + b"\0"
        nlink = 2 if (mode & 0o170000) == 0o040000 else 1
        fields = [ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rmaj, rmin, len(nb), 0]
        hdr = b"070701" + b"".join(f"{v:08X}".encode() for v in fields)
        out.write(hdr + nb)
        pad(len(hdr) + len(nb))
        out.write(data)
        pad(len(data))
        ino += 1
    return out.getvalue()


def make_initramfs(init_script: str, busybox: Path, compress: bool = False) -> bytes:
    """newc cpio: /init, /bin/busybox + applet links, /dev/console, mount points.

    Uncompressed by default: 2 MB instead of 1 MB to load, but no gunzip under TCG, which
    measured faster with both qemu 7.2 and qemu-kvm 0.12 (bench/boot.py).
    """
    bb = busybox.read_bytes()
    d, f, ln, c = 0o040755, 0o100755, 0o120777, 0o020600
    entries: list[tuple[str, int, bytes, int, int]] = [
        ("bin", d, b"", 0, 0), ("dev", d, b"", 0, 0), ("proc", d, b"", 0, 0),
        ("sys", d, b"", 0, 0), ("tmp", d, b"", 0, 0),
        ("dev/console", c, b"", 5, 1), ("dev/ttyS0", c, b"", 4, 64),
        ("dev/null", 0o020666, b"", 1, 3),
        ("bin/busybox", f, bb, 0, 0),
        ("init", f, init_script.encode(), 0, 0),
    ]
    for applet in ("sh", "mount", "cat", "grep", "sed", "cut", "uname", "nproc", "poweroff",
                   "reboot", "sleep", "echo", "ls", "dmesg"):
        entries.append((f"bin/{applet}", ln, b"busybox", 0, 0))
    data = _cpio_newc(entries)
    # mtime 0 in the gzip header: same inputs -> same bytes
    return gzip.compress(data, compresslevel=6, mtime=0) if compress else data


def _bzimage_payload(data: bytes) -> bytes | None:
    """The compressed kernel inside a bzImage (boot protocol >= 2.08: payload_offset/length)."""
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS" or \
            int.from_bytes(data[0x206:0x208], "little") < 0x208:
        return None
    setup_sects = data[0x1F1] or 4
    start = (setup_sects + 1) * 512 + int.from_bytes(data[0x248:0x24C], "little")
    return data[start:start + int.from_bytes(data[0x24C:0x250], "little")]


def has_pvh_note(elf: bytes) -> bool:
    """Does this ELF vmlinux carry XEN_ELFNOTE_PHYS32_ENTRY (18), i.e. can qemu boot it via PVH?"""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:  # 64-bit ELF only
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:
                return True
            pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


def extract_vmlinux(bzimage: Path) -> bytes | None:
    """The uncompressed ELF kernel of a bzImage (xz or gzip payload) when it can boot via PVH.

    Booting it skips the in-guest decompression, which is most of a TCG boot's time before the
    kernel's own clock starts (qemu >= 4.0 loads PVH kernels; qemu-kvm 0.12 cannot).
    """
    payload = _bzimage_payload(bzimage.read_bytes())
    if not payload:
        return None
    try:
        if payload.startswith(b"\xfd7zXZ\x00"):
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
        elif payload.startswith(b"\x1f\x8b"):
            elf = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
        else:
            return None  # zstd/lz4/lzo/bzip2 kernels: boot the bzImage
    except (lzma.LZMAError, zlib.error):
        return None
    return elf if has_pvh_note(elf) else None

