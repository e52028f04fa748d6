"""The tiny guest's boot sector: x86 real-mode code assembled here, instruction by instruction.

A 512-byte MBR that programs COM1, prints ``KVMLAB-BOOT-OK nonce=<placeholder>`` and powers the
machine off: first through the Bochs/QEMU ``Shutdown`` port 0x8900 (qemu-kvm 0.12 has it), then
through ACPI PM1a_CNT of the PIIX4 power-management function (``-M pc``), then halts.
"""
from __future__ import annotations

from kvmlab.boot.marker import MARKER, NONCE_PLACEHOLDER


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
    for part in (_setup, _uart, _print, _shutdown_port, _acpi_off, _halt, _data):
        part(a)
    return a


def _setup(a: _Asm) -> None:
    """Segments and a stack below the boot sector."""
    a.op(b"\xFA", "cli                     ; no interrupts while the stack is set up")
    a.op(b"\x31\xC0", "xor ax, ax              ; ax = 0")
    a.op(b"\x8E\xD8", "mov ds, ax              ; ds = 0 (data is addressed 0000:7Cxx)")
    a.op(b"\x8E\xD0", "mov ss, ax              ; ss = 0")
    a.op(b"\xBC\x00\x7C", "mov sp, 0x7C00          ; stack grows down below the sector")
    a.op(b"\xFC", "cld                     ; lodsb increments si")


def _uart(a: _Asm) -> None:
    """Program the 16550 UART at COM1 (0x3F8): 115200 baud, 8N1, FIFO on."""
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


def _print(a: _Asm) -> None:
    """Print the zero-terminated message, waiting for THR empty before each byte."""
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


def _shutdown_port(a: _Asm) -> None:
    """Power off, way 1: Bochs/QEMU "Shutdown" port (old qemu: writing the word shuts down)."""
    a.imm16(b"\xBE", "shut", "mov si, shut            ; si -> 'Shutdown'")
    a.op(b"\xBA\x00\x89", "mov dx, 0x8900          ; Bochs BIOS shutdown port")
    a.label("sloop")
    a.op(b"\xAC", "lodsb")
    a.op(b"\x84\xC0", "test al, al")
    a.rel8(0x74, "acpi", "jz acpi")
    a.op(b"\xEE", "out dx, al              ; one letter of 'Shutdown'")
    a.rel8(0xEB, "sloop", "jmp sloop")


def _acpi_off(a: _Asm) -> None:
    """Power off, way 2: ACPI S5 via PM1a_CNT = PMBASE + 4 of the PIIX4 PM function (00:01.3)."""
    a.label("acpi")
    a.op(b"\x66\xB8\x40\x0B\x00\x80",
         "mov eax, 0x80000B40     ; PCI config: bus 0, dev 1, fn 3, reg 0x40 (PMBASE)")
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


def _halt(a: _Asm) -> None:
    """Nothing worked: stop here forever."""
    a.label("halt")
    a.op(b"\xFA", "cli")
    a.op(b"\xF4", "hlt")
    a.rel8(0xEB, "halt", "jmp halt")


def _data(a: _Asm) -> None:
    a.label("msg")
    a.op(b"\r\n" + MARKER.encode() + b" nonce=" + NONCE_PLACEHOLDER + b"\r\n\x00",
         "db 13,10,'KVMLAB-BOOT-OK nonce=XXXXXXXXXXXXXXXX',13,10,0 (nonce patched per run)")
    a.label("shut")
    a.op(b"Shutdown\x00", "db 'Shutdown',0")


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

