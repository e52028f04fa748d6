"""The one ELF reader: the few facts kvmlab reads from ELF files without binutils.

``elf_needed`` (DT_NEEDED sonames through the program headers: what a built binary needs at run
time), ``read_modinfo`` (a kernel module's ``.modinfo`` key=value strings) and ``read_build_id``
(its GNU build id note). Plain ``struct`` parsing of ELF32/ELF64 in either byte order; ``.ko.xz``
is decompressed with lzma.
"""
from __future__ import annotations

import lzma
import struct
from pathlib import Path
from typing import Any

from kvmlab.core.errors import HostError


class ModinfoError(HostError):
    """A file is not a readable kernel module."""


def _open_module_bytes(path: Path) -> bytes:
    data = Path(path).read_bytes()
    if data[:6] == b"\xfd7zXZ\x00":          # .ko.xz (Debian's installed modules)
        data = lzma.decompress(data)
    elif data[:4] == b"\x28\xb5\x2f\xfd":     # .ko.zst: not in the standard library
        raise ModinfoError(f"{path}: zstd-compressed module; decompress it first (unzstd)")
    return data


def _elf_section(data: bytes, wanted: str, path: Path) -> bytes | None:
    if data[:4] != b"\x7fELF":
        raise ModinfoError(f"{path}: not an ELF file (not a kernel module)")
    cls, enc = data[4], data[5]
    if cls not in (1, 2) or enc not in (1, 2):
        raise ModinfoError(f"{path}: unknown ELF class/encoding {cls}/{enc}")
    e = "<" if enc == 1 else ">"
    try:
        if cls == 2:   # ELF64
            shoff, = struct.unpack_from(e + "Q", data, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from(e + "HHH", data, 0x3A)
            shdr = e + "IIQQQQIIQQ"
        else:          # ELF32
            shoff, = struct.unpack_from(e + "I", data, 0x20)
            shentsize, shnum, shstrndx = struct.unpack_from(e + "HHH", data, 0x2E)
            shdr = e + "IIIIIIIIII"
        sections = []
        for i in range(shnum):
            f = struct.unpack_from(shdr, data, shoff + i * shentsize)
            # name, type, flags, addr, offset, size, ...
            sections.append((f[0], f[1], f[4], f[5]))
        _, _, stroff, strsize = sections[shstrndx]
        strtab = data[stroff:stroff + strsize]
        for name_off, sh_type, off, size in sections:
            name = strtab[name_off:strtab.index(b"\0", name_off)].decode("ascii", "replace")
            if name == wanted:
                if sh_type == 8:   # SHT_NOBITS
                    return b""
                return data[off:off + size]
    except (struct.error, IndexError, ValueError) as err:
        raise ModinfoError(f"{path}: truncated or corrupt ELF file ({err})") from None
    return None


def read_modinfo(ko_path: Path | str) -> dict[str, Any]:
    """The key=value strings of a kernel module's .modinfo section (what `modinfo` prints).

    Values are strings; a key that occurs more than once (alias, parm, parmtype, firmware, ...)
    maps to the list of its values in file order. Works on .ko and .ko.xz."""
    path = Path(ko_path)
    try:
        data = _open_module_bytes(path)
    except FileNotFoundError:
        raise ModinfoError(f"module file not found: {path}") from None
    except (OSError, lzma.LZMAError) as err:
        raise ModinfoError(f"cannot read {path}: {err}") from None
    sec = _elf_section(data, ".modinfo", path)
    if sec is None:
        raise ModinfoError(f"{path}: no .modinfo section (not a kernel module)")
    info: dict[str, Any] = {}
    for raw in sec.split(b"\0"):
        if b"=" not in raw:
            continue
        k, v = raw.decode("utf-8", "replace").split("=", 1)
        if k in info:
            if not isinstance(info[k], list):
                info[k] = [info[k]]
            info[k].append(v)
        else:
            info[k] = v
    if "vermagic" not in info:
        raise ModinfoError(f"{path}: .modinfo has no vermagic (not a loadable kernel module)")
    return info


def read_build_id(ko_path: Path | str) -> tuple[str, str]:
    """(GNU build id as hex, the whole .note.gnu.build-id section as hex) of a module; the
    latter is what a loaded module shows in /sys/module/<name>/notes/.note.gnu.build-id, so it
    identifies the exact file that was loaded (modules have no srcversion unless they declare
    MODULE_VERSION or the kernel sets CONFIG_MODULE_SRCVERSION_ALL). ('', '') when absent."""
    path = Path(ko_path)
    try:
        data = _open_module_bytes(path)
    except (OSError, lzma.LZMAError) as err:
        raise ModinfoError(f"cannot read {path}: {err}") from None
    note = _elf_section(data, ".note.gnu.build-id", path)
    if not note or len(note) < 16:
        return "", ""
    e = "<" if data[5] == 1 else ">"
    namesz, descsz, _ = struct.unpack_from(e + "III", note, 0)
    start = 12 + ((namesz + 3) & ~3)
    return note[start:start + descsz].hex(), note.hex()


# --------------------------------------------------------------------------------------------
# dynamic section

def _segments(data: bytes, e: str) -> tuple[list[tuple[int, int, int]], tuple[int, int] | None]:
    """(PT_LOAD segments as (vaddr, offset, filesz), the PT_DYNAMIC (offset, filesz) or None)."""
    if data[4] == 2:   # ELF64
        phoff, = struct.unpack_from(e + "Q", data, 0x20)
        phentsize, phnum = struct.unpack_from(e + "HH", data, 0x36)
        phdr = e + "IIQQQQQQ"
        fields = lambda f: (f[0], f[2], f[3], f[5])  # noqa: E731 - type, offset, vaddr, filesz
    else:              # ELF32
        phoff, = struct.unpack_from(e + "I", data, 0x1C)
        phentsize, phnum = struct.unpack_from(e + "HH", data, 0x2A)
        phdr = e + "IIIIIIII"
        fields = lambda f: (f[0], f[1], f[2], f[4])  # noqa: E731
    loads, dynamic = [], None
    for i in range(phnum):
        p_type, off, vaddr, filesz = fields(struct.unpack_from(phdr, data, phoff + i * phentsize))
        if p_type == 1:      # PT_LOAD
            loads.append((vaddr, off, filesz))
        elif p_type == 2:    # PT_DYNAMIC
            dynamic = (off, filesz)
    return loads, dynamic


def elf_needed(path: Path) -> list[str] | None:
    """The DT_NEEDED sonames of an ELF file, in order, read through its program headers (the
    loader's view; works on stripped files). None: not an ELF file; []: static or no dynamic
    section."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    if data[:4] != b"\x7fELF" or data[4] not in (1, 2) or data[5] not in (1, 2):
        return None
    e = "<" if data[5] == 1 else ">"
    dyn = e + ("qQ" if data[4] == 2 else "iI")
    try:
        loads, dynamic = _segments(data, e)
        if dynamic is None:
            return []
        needed, strtab = [], None
        step = struct.calcsize(dyn)
        for pos in range(dynamic[0], dynamic[0] + dynamic[1] - step + 1, step):
            tag, val = struct.unpack_from(dyn, data, pos)
            if tag == 0:         # DT_NULL
                break
            if tag == 1:         # DT_NEEDED: offset into the string table
                needed.append(val)
            elif tag == 5:       # DT_STRTAB: an address
                strtab = next((val - va + off for va, off, sz in loads if va <= val < va + sz),
                              None)
        if strtab is None:
            return [] if not needed else None
        out = []
        for n in needed:
            start = strtab + n
            out.append(data[start:data.index(b"\0", start)].decode("utf-8", "replace"))
        return out
    except (struct.error, ValueError, IndexError):
        return None
