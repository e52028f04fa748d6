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
import glob
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from kvmlab.core.errors import VMError
from kvmlab.core.fsutil import json_sha256
from kvmlab.core.settings import Settings

KINDS = ("tiny", "linux", "iso")
MARKER = "KVMLAB-BOOT-OK"
NONCE_LEN = 16
NONCE_PLACEHOLDER = b"X" * NONCE_LEN
FACT_PREFIX = "KVMLAB-FACT "
GUEST_FORMAT_VERSION = 3  # bump when the way guests are made changes (invalidates the cache)

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


# --------------------------------------------------------------------------------------------
# The tiny guest: a boot sector assembled here
# --------------------------------------------------------------------------------------------

class _Asm:
    """Just enough of a 16-bit assembler: raw bytes, labels and 8/16-bit label references."""

    def __init__(self, origin: int):
        self.origin = origin
        self.items: list[tuple] = []  # ("b", bytes, comment) | ("rel8", opcode, label, comment) ...
        self.labels: dict[str, int] = {}

    def op(self, code: bytes, comment: str) -> None:
        self.items.append(("b", code, comment))

    def rel8(self, opcode: int, label: str, comment: str) -> None:
        self.items.append(("rel8", opcode, label, comment))

    def imm16(self, prefix: bytes, label: str, comment: str) -> None:
        self.items.append(("abs16", prefix, label, comment))

    def label(self, name: str) -> None:
        self.items.append(("label", name))

    @staticmethod
    def _size(it: tuple) -> int:
        return {"b": lambda: len(it[1]), "rel8": lambda: 2, "abs16": lambda: len(it[1]) + 2,
                "label": lambda: 0}[it[0]]()

    def assemble(self) -> tuple[bytes, list[tuple[int, bytes, str]]]:
        pos = 0
        for it in self.items:
            if it[0] == "label":
                self.labels[it[1]] = pos
            pos += self._size(it)
        out = bytearray()
        listing = []
        for it in self.items:
            start = len(out)
            if it[0] == "b":
                out += it[1]
                comment = it[2]
            elif it[0] == "rel8":
                disp = self.labels[it[2]] - (start + 2)
                if not -128 <= disp <= 127:
                    raise ValueError(f"jump to {it[2]} out of range")
                out += bytes([it[1], disp & 0xFF])
                comment = it[3]
            elif it[0] == "abs16":
                out += it[1] + (self.origin + self.labels[it[2]]).to_bytes(2, "little")
                comment = it[3]
            else:
                continue
            listing.append((start, bytes(out[start:]), comment))
        return bytes(out), listing


def _boot_sector_asm() -> _Asm:
    a = _Asm(origin=0x7C00)  # the BIOS loads the MBR at 0000:7C00 and jumps there with DL=drive
    # --- set up segments and a stack below the boot sector
    a.op(b"\xFA", "cli                     ; no interrupts while the stack is set up")
    a.op(b"\x31\xC0", "xor ax, ax              ; ax = 0")
    a.op(b"\x8E\xD8", "mov ds, ax              ; ds = 0 (data is addressed 0000:7Cxx)")
    a.op(b"\x8E\xD0", "mov ss, ax              ; ss = 0")
    a.op(b"\xBC\x00\x7C", "mov sp, 0x7C00          ; stack grows down below the sector")
    a.op(b"\xFC", "cld                     ; lodsb increments si")
    # --- program the 16550 UART at COM1 (0x3F8): 115200 baud, 8N1, FIFO on
    for port, value, what in ((0x3F9, 0x00, "IER = 0: no UART interrupts"),
                              (0x3FB, 0x80, "LCR = 0x80: DLAB on, divisor latch visible"),
                              (0x3F8, 0x01, "DLL = 1: divisor 1 = 115200 baud"),
                              (0x3F9, 0x00, "DLM = 0: divisor high byte"),
                              (0x3FB, 0x03, "LCR = 0x03: DLAB off, 8 data bits, no parity, 1 stop"),
                              (0x3FA, 0xC7, "FCR = 0xC7: enable and clear FIFOs"),
                              (0x3FC, 0x0B, "MCR = 0x0B: DTR, RTS, OUT2")):
        a.op(b"\xBA" + port.to_bytes(2, "little"), f"mov dx, 0x{port:03X}")
        a.op(b"\xB0" + bytes([value]), f"mov al, 0x{value:02X}")
        a.op(b"\xEE", f"out dx, al              ; {what}")
    # --- print the zero-terminated message, waiting for THR empty before each byte
    a.imm16(b"\xBE", "msg", "mov si, msg             ; si -> marker text")
    a.label("next")
    a.op(b"\xAC", "lodsb                   ; al = [si], si += 1")
    a.op(b"\x84\xC0", "test al, al             ; end of string?")
    a.rel8(0x74, "done", "jz done")
    a.op(b"\x88\xC4", "mov ah, al              ; keep the character in ah")
    a.op(b"\xBA\xFD\x03", "mov dx, 0x3FD           ; LSR: line status register")
    a.label("wait")
    a.op(b"\xEC", "in al, dx")
    a.op(b"\xA8\x20", "test al, 0x20           ; THRE: transmitter holding register empty?")
    a.rel8(0x74, "wait", "jz wait")
    a.op(b"\x88\xE0", "mov al, ah")
    a.op(b"\xBA\xF8\x03", "mov dx, 0x3F8           ; THR")
    a.op(b"\xEE", "out dx, al              ; send the character")
    a.rel8(0xEB, "next", "jmp next")
    a.label("done")
    # --- power off, way 1: Bochs/QEMU "Shutdown" port (old qemu: writing the word shuts down)
    a.imm16(b"\xBE", "shut", "mov si, shut            ; si -> 'Shutdown'")
    a.op(b"\xBA\x00\x89", "mov dx, 0x8900          ; Bochs BIOS shutdown port")
    a.label("sloop")
    a.op(b"\xAC", "lodsb")
    a.op(b"\x84\xC0", "test al, al")
    a.rel8(0x74, "acpi", "jz acpi")
    a.op(b"\xEE", "out dx, al              ; one letter of 'Shutdown'")
    a.rel8(0xEB, "sloop", "jmp sloop")
    a.label("acpi")
    # --- power off, way 2: ACPI S5 via PM1a_CNT = PMBASE + 4 of the PIIX4 PM function (00:01.3)
    a.op(b"\x66\xB8\x40\x0B\x00\x80", "mov eax, 0x80000B40     ; PCI config: bus 0, dev 1, fn 3, reg 0x40 (PMBASE)")
    a.op(b"\xBA\xF8\x0C", "mov dx, 0x0CF8          ; PCI CONFIG_ADDRESS")
    a.op(b"\x66\xEF", "out dx, eax")
    a.op(b"\xBA\xFC\x0C", "mov dx, 0x0CFC          ; PCI CONFIG_DATA")
    a.op(b"\x66\xED", "in eax, dx              ; eax = PMBASE | 1 (I/O space indicator)")
    a.op(b"\x25\xC0\xFF", "and ax, 0xFFC0          ; base address bits 15:6")
    a.rel8(0x74, "defpm", "jz defpm                ; not programmed: use qemu's usual 0x600")
    a.op(b"\x3D\xC0\xFF", "cmp ax, 0xFFC0          ; all ones: no PIIX4 PM function here")
    a.rel8(0x75, "havepm", "jne havepm")
    a.label("defpm")
    a.op(b"\xB8\x00\x06", "mov ax, 0x0600          ; PMBASE SeaBIOS programs on qemu's pc machine")
    a.label("havepm")
    a.op(b"\x05\x04\x00", "add ax, 4               ; PM1a_CNT = PMBASE + 4 (0x604 on qemu pc)")
    a.op(b"\x89\xC2", "mov dx, ax")
    a.op(b"\xB8\x00\x20", "mov ax, 0x2000          ; SLP_EN (bit 13) with SLP_TYP 0 = S5 on qemu")
    a.op(b"\xEF", "out dx, ax              ; power off")
    # --- nothing worked: stop here forever
    a.label("halt")
    a.op(b"\xFA", "cli")
    a.op(b"\xF4", "hlt")
    a.rel8(0xEB, "halt", "jmp halt")
    a.label("msg")
    a.op(b"\r\n" + MARKER.encode() + b" nonce=" + NONCE_PLACEHOLDER + b"\r\n\x00",
         "db 13,10,'KVMLAB-BOOT-OK nonce=XXXXXXXXXXXXXXXX',13,10,0 (nonce patched per run)")
    a.label("shut")
    a.op(b"Shutdown\x00", "db 'Shutdown',0")
    return a


def boot_sector() -> bytes:
    """The 512-byte MBR: code + message, zero padding, 0x55 0xAA signature."""
    code, _ = _boot_sector_asm().assemble()
    if len(code) > 446:  # keep the partition table area free
        raise AssertionError(f"boot sector code too large: {len(code)} bytes")
    return code + bytes(510 - len(code)) + b"\x55\xAA"


def boot_sector_listing() -> str:
    """Offset, bytes and instruction of the boot sector (for `invoke guest --kind tiny -v`)."""
    _, listing = _boot_sector_asm().assemble()
    return "\n".join(f"{0x7C00 + off:04X}  {code.hex(' '):<20}  {comment}"
                     for off, code, comment in listing)


# --------------------------------------------------------------------------------------------
# Guests on disk
# --------------------------------------------------------------------------------------------

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
    inputs: dict = field(default_factory=dict)


def new_nonce() -> str:
    return os.urandom(NONCE_LEN // 2).hex()


def marker_for(nonce: str) -> str:
    return f"{MARKER} nonce={nonce}"


def _hash(inputs: dict) -> str:
    return json_sha256(inputs)[:16]


def _file_id(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _guest_dir(settings: Settings, kind: str, inputs: dict) -> Path:
    return settings.cache / "guests" / f"{kind}-{_hash(inputs)}"


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished temp dir into place (a concurrent builder may have won: keep theirs)."""
    os.chmod(tmp, 0o755)
    try:
        os.rename(tmp, final)
    except OSError:
        if (final / "guest.json").exists():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise


def _load(final: Path, kind: str) -> Guest | None:
    meta = final / "guest.json"
    if not meta.exists():
        return None
    d = json.loads(meta.read_text())
    paths = {k: (final / d[k] if d.get(k) else None)
             for k in ("disk", "kernel", "vmlinux", "initrd", "iso")}
    if not all(p.exists() for p in paths.values() if p):
        return None
    return Guest(kind, final, cmdline=d.get("cmdline", ""), cached=True, inputs=d["inputs"], **paths)


def _finish(tmp: Path, final: Path, kind: str, inputs: dict, **files: str) -> Guest:
    cmdline = files.pop("cmdline", "")
    (tmp / "guest.json").write_text(json.dumps({"inputs": inputs, "cmdline": cmdline, **files},
                                               indent=2))
    _publish(tmp, final)
    g = _load(final, kind)
    assert g is not None
    return dataclasses.replace(g, cached=False)


def make_tiny(settings: Settings, force: bool = False) -> Guest:
    sector = boot_sector()
    inputs = {"kind": "tiny", "v": GUEST_FORMAT_VERSION,
              "sector": hashlib.sha256(sector).hexdigest()}
    final = _guest_dir(settings, "tiny", inputs)
    if not force and (g := _load(final, "tiny")):
        return g
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(final, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=final.parent))
    # 64 KiB raw disk: the boot sector, then zeros (SeaBIOS wants more than one sector)
    (tmp / "disk.raw").write_bytes(sector + bytes(64 * 1024 - 512))
    (tmp / "bootsector.lst").write_text(boot_sector_listing() + "\n")
    return _finish(tmp, final, "tiny", inputs, disk="disk.raw")


# ---- linux ----------------------------------------------------------------------------------

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
        if p.is_file():
            r = subprocess.run(["file", "-b", str(p)], capture_output=True, text=True, timeout=10) \
                if shutil.which("file") else None
            if r is None or "dynamically linked" not in r.stdout:
                return p
    raise VMError("no static busybox found", hint="apt-get install busybox-static")


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
    d, f, l, c = 0o040755, 0o100755, 0o120777, 0o020600
    entries: list[tuple[str, int, bytes, int, int]] = [
        ("bin", d, b"", 0, 0), ("dev", d, b"", 0, 0), ("proc", d, b"", 0, 0),
        ("sys", d, b"", 0, 0), ("tmp", d, b"", 0, 0),
        ("dev/console", c, b"", 5, 1), ("dev/ttyS0", c, b"", 4, 64), ("dev/null", 0o020666, b"", 1, 3),
        ("bin/busybox", f, bb, 0, 0),
        ("init", f, init_script.encode(), 0, 0),
    ]
    for applet in ("sh", "mount", "cat", "grep", "sed", "cut", "uname", "nproc", "poweroff",
                   "reboot", "sleep", "echo", "ls", "dmesg"):
        entries.append((f"bin/{applet}", l, b"busybox", 0, 0))
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
    import struct
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
    import lzma
    import zlib
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


def make_linux(settings: Settings, kernel: str | Path | None = None, init_script: str | None = None,
               force: bool = False) -> Guest:
    k = find_kernel(kernel)
    bb = find_busybox()
    init = init_script if init_script is not None else DEFAULT_INIT
    inputs = {"kind": "linux", "v": GUEST_FORMAT_VERSION, "kernel": _file_id(k),
              "busybox": _file_id(bb), "init": hashlib.sha256(init.encode()).hexdigest(),
              "cmdline": KERNEL_CMDLINE}
    final = _guest_dir(settings, "linux", inputs)
    if not force and (g := _load(final, "linux")):
        return g
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(final, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".linux-", dir=final.parent))
    try:
        shutil.copyfile(k, tmp / "vmlinuz")
        (tmp / "initrd.cpio").write_bytes(make_initramfs(init, bb))
        (tmp / "init").write_text(init)
        extra = {}
        elf = extract_vmlinux(k)
        if elf:
            (tmp / "vmlinux").write_bytes(elf)
            extra["vmlinux"] = "vmlinux"
        return _finish(tmp, final, "linux", inputs, kernel="vmlinuz", initrd="initrd.cpio",
                       cmdline=KERNEL_CMDLINE, **extra)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- iso ------------------------------------------------------------------------------------

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


def make_iso(settings: Settings, kernel: str | Path | None = None, init_script: str | None = None,
             force: bool = False, timeout: float = 300) -> Guest:
    lin = make_linux(settings, kernel, init_script)
    mkrescue = shutil.which("grub-mkrescue")
    if not mkrescue or not Path("/usr/lib/grub/i386-pc").is_dir():
        raise VMError("grub-mkrescue with BIOS (i386-pc) support is not installed",
                      hint="apt-get install grub-common grub-pc-bin xorriso mtools")
    for tool in ("xorriso", "mformat"):
        if not shutil.which(tool):
            raise VMError(f"{tool} is not installed (grub-mkrescue needs it)",
                          hint="apt-get install xorriso mtools")
    cfg = GRUB_CFG.format(cmdline=KERNEL_CMDLINE, placeholder=NONCE_PLACEHOLDER.decode())
    grub_ver = subprocess.run([mkrescue, "--version"], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    inputs = {"kind": "iso", "v": GUEST_FORMAT_VERSION, "linux": lin.inputs, "grub_cfg": cfg,
              "grub": grub_ver}
    final = _guest_dir(settings, "iso", inputs)
    if not force and (g := _load(final, "iso")):
        return g
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(final, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".iso-", dir=final.parent))
    try:
        root = tmp / "root"
        (root / "boot" / "grub").mkdir(parents=True)
        shutil.copyfile(lin.kernel, root / "boot" / "vmlinuz")
        shutil.copyfile(lin.initrd, root / "boot" / "initrd.cpio")
        (root / "boot" / "grub" / "grub.cfg").write_text(cfg)
        # BIOS only (i386-pc), few modules: a small, quick image
        cmd = [mkrescue, "-o", str(tmp / "guest.iso"), "-d", "/usr/lib/grub/i386-pc",
               "--install-modules=linux normal iso9660 biosdisk serial terminal echo test",
               "--fonts=", "--locales=", "--themes=", str(root)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "SOURCE_DATE_EPOCH": "0"})
        if r.returncode != 0 or not (tmp / "guest.iso").exists():
            raise VMError("grub-mkrescue failed: " + (r.stderr.strip().splitlines() or ["?"])[-1],
                          hint="command: " + " ".join(cmd))
        shutil.rmtree(root)
        data = (tmp / "guest.iso").read_bytes()
        if data.count(b"kvmlab.nonce=" + NONCE_PLACEHOLDER) < 1:
            raise VMError("the ISO does not contain grub.cfg's nonce placeholder in plain text")
        return _finish(tmp, final, "iso", inputs, iso="guest.iso", cmdline=KERNEL_CMDLINE)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def make_guest(settings: Settings, kind: str, *, kernel: str | Path | None = None,
               init_script: str | None = None, force: bool = False) -> Guest:
    if kind == "tiny":
        return make_tiny(settings, force=force)
    if kind == "linux":
        return make_linux(settings, kernel, init_script, force=force)
    if kind == "iso":
        return make_iso(settings, kernel, init_script, force=force)
    raise VMError(f"unknown guest kind {kind!r}", hint="use one of " + ", ".join(KINDS))


def patch_nonce(src: Path, dst: Path, nonce: str) -> int:
    """Copy src to dst with every nonce placeholder replaced; returns how many were patched."""
    if len(nonce) != NONCE_LEN or not re.fullmatch(r"[0-9a-f]+", nonce):
        raise ValueError("nonce must be 16 lowercase hex digits")
    data = src.read_bytes()
    key = b"nonce=" + NONCE_PLACEHOLDER  # 'KVMLAB-BOOT-OK nonce=' (tiny), 'kvmlab.nonce=' (iso)
    n = data.count(key)
    if n == 0:
        raise VMError(f"{src} has no nonce placeholder", hint="rebuild it: invoke guest --force")
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_bytes(data.replace(key, b"nonce=" + nonce.encode()))
    os.replace(tmp, dst)
    return n
