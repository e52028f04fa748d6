"""The KVM API from Python: ioctl numbers, structures and a real-mode probe guest.

Only the standard library is used (fcntl.ioctl, mmap, ctypes, struct). The numbers and layouts are
those of <linux/kvm.h> for x86-64 (stable ABI since KVM_API_VERSION 12, Linux 2.6.22).

The probe guests (``run_probe``) is meant to run in a throw-away child process (see
``kvmlab.host.doctor.probe_kvm``): a broken KVM can hang in KVM_RUN, and a child can be killed.
Run ``python3 -m kvmlab.host.kvmapi --probe-child`` to get its JSON record on stdout.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import os
import random
import struct
import sys
from typing import Any

DEV_KVM = "/dev/kvm"
KVM_API_VERSION = 12

# ---------------------------------------------------------------------------------------------
# ioctl number encoding (asm-generic/ioctl.h)
_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << _IOC_DIRSHIFT) | (KVMIO << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | \
        (size << _IOC_SIZESHIFT)


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


# ---------------------------------------------------------------------------------------------
# Structures (x86-64 layout)
class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("guest_phys_addr", ctypes.c_uint64), ("memory_size", ctypes.c_uint64),
                ("userspace_addr", ctypes.c_uint64)]


class kvm_regs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint32),
                ("selector", ctypes.c_uint16), ("type", ctypes.c_uint8),
                ("present", ctypes.c_uint8), ("dpl", ctypes.c_uint8), ("db", ctypes.c_uint8),
                ("s", ctypes.c_uint8), ("l", ctypes.c_uint8), ("g", ctypes.c_uint8),
                ("avl", ctypes.c_uint8), ("unusable", ctypes.c_uint8),
                ("padding", ctypes.c_uint8)]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16),
                ("padding", ctypes.c_uint16 * 3)]


class kvm_sregs(ctypes.Structure):
    _fields_ = [("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment),
                ("fs", kvm_segment), ("gs", kvm_segment), ("ss", kvm_segment),
                ("tr", kvm_segment), ("ldt", kvm_segment),
                ("gdt", kvm_dtable), ("idt", kvm_dtable),
                ("cr0", ctypes.c_uint64), ("cr2", ctypes.c_uint64), ("cr3", ctypes.c_uint64),
                ("cr4", ctypes.c_uint64), ("cr8", ctypes.c_uint64), ("efer", ctypes.c_uint64),
                ("apic_base", ctypes.c_uint64), ("interrupt_bitmap", ctypes.c_uint64 * 4)]


assert ctypes.sizeof(kvm_userspace_memory_region) == 32
assert ctypes.sizeof(kvm_regs) == 144
assert ctypes.sizeof(kvm_sregs) == 312

KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _ioc(_IOC_WRITE, 0x46, ctypes.sizeof(kvm_userspace_memory_region))
KVM_SET_TSS_ADDR = _io(0x47)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ioc(_IOC_READ, 0x81, ctypes.sizeof(kvm_regs))
KVM_SET_REGS = _ioc(_IOC_WRITE, 0x82, ctypes.sizeof(kvm_regs))
KVM_GET_SREGS = _ioc(_IOC_READ, 0x83, ctypes.sizeof(kvm_sregs))
KVM_SET_SREGS = _ioc(_IOC_WRITE, 0x84, ctypes.sizeof(kvm_sregs))

# KVM_EXIT_* (struct kvm_run.exit_reason)
KVM_EXITS: dict[int, str] = {
    0: "KVM_EXIT_UNKNOWN", 1: "KVM_EXIT_EXCEPTION", 2: "KVM_EXIT_IO", 3: "KVM_EXIT_HYPERCALL",
    4: "KVM_EXIT_DEBUG", 5: "KVM_EXIT_HLT", 6: "KVM_EXIT_MMIO", 7: "KVM_EXIT_IRQ_WINDOW_OPEN",
    8: "KVM_EXIT_SHUTDOWN", 9: "KVM_EXIT_FAIL_ENTRY", 10: "KVM_EXIT_INTR",
    11: "KVM_EXIT_SET_TPR", 12: "KVM_EXIT_TPR_ACCESS", 13: "KVM_EXIT_S390_SIEIC",
    14: "KVM_EXIT_S390_RESET", 15: "KVM_EXIT_DCR", 16: "KVM_EXIT_NMI",
    17: "KVM_EXIT_INTERNAL_ERROR", 18: "KVM_EXIT_OSI", 19: "KVM_EXIT_PAPR_HCALL",
    20: "KVM_EXIT_S390_UCONTROL", 21: "KVM_EXIT_WATCHDOG", 22: "KVM_EXIT_S390_TSCH",
    23: "KVM_EXIT_EPR", 24: "KVM_EXIT_SYSTEM_EVENT", 25: "KVM_EXIT_S390_STSI",
    26: "KVM_EXIT_IOAPIC_EOI", 27: "KVM_EXIT_HYPERV", 28: "KVM_EXIT_ARM_NISV",
    29: "KVM_EXIT_X86_RDMSR", 30: "KVM_EXIT_X86_WRMSR", 31: "KVM_EXIT_DIRTY_RING_FULL",
    32: "KVM_EXIT_AP_RESET_HOLD", 33: "KVM_EXIT_X86_BUS_LOCK", 34: "KVM_EXIT_XEN",
    35: "KVM_EXIT_RISCV_SBI", 36: "KVM_EXIT_RISCV_CSR", 37: "KVM_EXIT_NOTIFY",
    38: "KVM_EXIT_LOONGARCH_IOCSR", 39: "KVM_EXIT_MEMORY_FAULT", 40: "KVM_EXIT_TDX",
}
KVM_EXIT_IO, KVM_EXIT_HLT, KVM_EXIT_FAIL_ENTRY = 2, 5, 9
KVM_EXIT_SHUTDOWN, KVM_EXIT_INTR, KVM_EXIT_INTERNAL_ERROR = 8, 10, 17
KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1

# struct kvm_run.internal.suberror
KVM_INTERNAL_ERRORS: dict[int, str] = {
    1: "KVM_INTERNAL_ERROR_EMULATION",
    2: "KVM_INTERNAL_ERROR_SIMUL_EX",
    3: "KVM_INTERNAL_ERROR_DELIVERY_EV",
    4: "KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON",
}

# A few capabilities worth reporting (KVM_CHECK_EXTENSION on /dev/kvm).
KVM_CAPS: dict[str, int] = {
    "KVM_CAP_IRQCHIP": 0, "KVM_CAP_HLT": 1, "KVM_CAP_USER_MEMORY": 3,
    "KVM_CAP_SET_TSS_ADDR": 4, "KVM_CAP_EXT_CPUID": 7, "KVM_CAP_NR_VCPUS": 9,
    "KVM_CAP_NR_MEMSLOTS": 10, "KVM_CAP_PIT": 11, "KVM_CAP_SYNC_MMU": 16,
    "KVM_CAP_IOEVENTFD": 36, "KVM_CAP_INTERNAL_ERROR_DATA": 40, "KVM_CAP_XSAVE": 55,
    "KVM_CAP_MAX_VCPUS": 66, "KVM_CAP_IMMEDIATE_EXIT": 136, "KVM_CAP_NESTED_STATE": 157,
}

# struct kvm_run: offsets of the fields used here
_RUN_EXIT_REASON = 8
_RUN_UNION = 32


def check_extension(fd: int, cap: int) -> int:
    return fcntl.ioctl(fd, KVM_CHECK_EXTENSION, cap)


def api_facts(path: str = DEV_KVM) -> dict[str, Any]:
    """Open /dev/kvm, return {"api_version", "caps": {name: value}}; raises OSError."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)
        caps: dict[str, int | str] = {}
        for name, num in KVM_CAPS.items():
            try:
                caps[name] = check_extension(fd, num)
            except OSError as e:
                caps[name] = f"error {errno.errorcode.get(e.errno or 0, e.errno)}"
        return {"api_version": version, "caps": caps}
    finally:
        os.close(fd)


def _decode_exit(run: mmap.mmap | bytes) -> dict[str, Any]:
    """Decode struct kvm_run after KVM_RUN returned: exit reason and the union member used."""
    reason = struct.unpack_from("<I", run, _RUN_EXIT_REASON)[0]
    rec: dict[str, Any] = {"exit_reason": reason, "exit_name": KVM_EXITS.get(reason, "?")}
    if reason == KVM_EXIT_IO:
        direction, size, port, count, data_offset = struct.unpack_from("<BBHIQ", run, _RUN_UNION)
        rec.update(direction="out" if direction == KVM_EXIT_IO_OUT else "in", size=size,
                   port=port, count=count)
        if size in (1, 2, 4) and 0 < data_offset < len(run) - size:
            rec["value"] = int.from_bytes(run[data_offset:data_offset + size], "little")
    elif reason == KVM_EXIT_INTERNAL_ERROR:
        suberror, ndata = struct.unpack_from("<II", run, _RUN_UNION)
        data = list(struct.unpack_from("<16Q", run, _RUN_UNION + 8))[:min(ndata, 16)]
        rec.update(suberror=suberror, suberror_name=KVM_INTERNAL_ERRORS.get(suberror, "?"),
                   data=[hex(d) for d in data])
        if suberror == 1 and data and data[0] & 1 and len(data) >= 3:
            # emulation_failure: flags, then insn_size (u8) + insn_bytes[15]
            raw = struct.pack("<2Q", data[1], data[2])
            size = min(raw[0], 15)
            rec["insn_bytes"] = raw[1:1 + size].hex(" ")
    elif reason == KVM_EXIT_FAIL_ENTRY:
        hw_reason, cpu = struct.unpack_from("<QI", run, _RUN_UNION)
        rec.update(hardware_entry_failure_reason=hex(hw_reason), cpu=cpu)
    elif reason == 0:  # KVM_EXIT_UNKNOWN: hw.hardware_exit_reason
        rec["hardware_exit_reason"] = hex(struct.unpack_from("<Q", run, _RUN_UNION)[0])
    return rec


# ---------------------------------------------------------------------------------------------
# vCPU statistics (KVM_GET_STATS_FD, Linux >= 5.14): tell emulated from executed guest code
KVM_GET_STATS_FD = _io(0xCE)


def vcpu_stats(vcpu_fd: int) -> dict[str, int]:
    """The vCPU's binary statistics (first value of each), e.g. exits, insn_emulation."""
    sfd = fcntl.ioctl(vcpu_fd, KVM_GET_STATS_FD, 0)
    try:
        _flags, name_size, num_desc, _id_off, desc_off, data_off = \
            struct.unpack("<6I", os.pread(sfd, 24, 0))
        dsz = 16 + name_size
        descs = os.pread(sfd, dsz * num_desc, desc_off)
        out: dict[str, int] = {}
        for i in range(num_desc):
            _fl, _exp, size, off, _bsz = struct.unpack_from("<IhHII", descs, i * dsz)
            name = descs[i * dsz + 16:(i + 1) * dsz].split(b"\0")[0].decode()
            if size >= 1:
                out[name] = struct.unpack("<Q", os.pread(sfd, 8, data_off + off))[0]
        return out
    finally:
        os.close(sfd)


# ---------------------------------------------------------------------------------------------
# The probe guests
GUEST_LOAD_ADDR = 0x1000
GUEST_DATA_ADDR = 0x2000
GUEST_MEM_SIZE = 0x10000
PROBE_PORT = 0xE9  # the Bochs/qemu debug port: harmless if this code ever reached real hardware
LOOP_COUNT = 1000


def basic_guest(nonce: int) -> tuple[bytes, int, int]:
    """16-bit real-mode code: ax = 0x1234 + bx; out 0xE9, ax; hlt.

    bx is set by the host to a random nonce, so the value seen at the I/O exit proves the vCPU
    really computed (nothing could guess it). Returns (code, expected OUT value, instructions)."""
    code = bytes([
        0xB8, 0x34, 0x12,        # mov ax, 0x1234
        0x01, 0xD8,              # add ax, bx
        0xBA, PROBE_PORT, 0x00,  # mov dx, 0x00e9
        0xEF,                    # out dx, ax
        0xF4,                    # hlt
    ])
    return code, (0x1234 + nonce) & 0xFFFF, 5


def workload_guest(nonce: int) -> tuple[bytes, int, int]:
    """What any BIOS or OS does early: a loop and x87 arithmetic, still in real mode.

    ax = LOOP_COUNT * bx, then + (1.0 + 1.0 computed by the FPU); out 0xE9, ax; hlt.
    Hardware virtualization runs this natively with no exit until the OUT; an instruction
    emulator (paravirtual KVM running a non-paravirtual guest) must decode every instruction."""
    lo, hi = LOOP_COUNT & 0xFF, LOOP_COUNT >> 8
    d_lo, d_hi = GUEST_DATA_ADDR & 0xFF, GUEST_DATA_ADDR >> 8
    code = bytes([
        0xB8, 0x00, 0x00,        # mov ax, 0
        0xB9, lo, hi,            # mov cx, LOOP_COUNT
        0x01, 0xD8,              # l: add ax, bx
        0x49,                    # dec cx
        0x75, 0xFB,              # jnz l
        0xDB, 0xE3,              # fninit
        0xD9, 0xE8,              # fld1
        0xD9, 0xE8,              # fld1
        0xDE, 0xC1,              # faddp st1, st0
        0xDF, 0x1E, d_lo, d_hi,  # fistp word [GUEST_DATA_ADDR]
        0x03, 0x06, d_lo, d_hi,  # add ax, [GUEST_DATA_ADDR]
        0xBA, PROBE_PORT, 0x00,  # mov dx, 0x00e9
        0xEF,                    # out dx, ax
        0xF4,                    # hlt
    ])
    return code, (LOOP_COUNT * nonce + 2) & 0xFFFF, 2 + 3 * LOOP_COUNT + 9


def _setup_vcpu(kvm: int, code: bytes, nonce: int, rec: dict[str, Any], fds: list[int],
                maps: list[mmap.mmap]) -> tuple[int, mmap.mmap]:
    """A VM with guest memory holding ``code`` and one real-mode vCPU at its start; every fd and
    mapping is appended to ``fds``/``maps`` (the caller closes them); rec["stage"] follows."""
    rec["stage"] = "KVM_CREATE_VM"
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    fds.append(vm)
    rec["stage"] = "mmap guest memory"
    mem = mmap.mmap(-1, GUEST_MEM_SIZE, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS,
                    prot=mmap.PROT_READ | mmap.PROT_WRITE)
    # kept until the VM is closed: garbage-collected here, the mapping would be gone before
    # KVM_RUN (EFAULT) -- seen the first time the probe ran on a KVM that runs guests
    maps.append(mem)
    mem[GUEST_LOAD_ADDR:GUEST_LOAD_ADDR + len(code)] = code
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    rec["stage"] = "KVM_SET_USER_MEMORY_REGION"
    region = kvm_userspace_memory_region(slot=0, flags=0, guest_phys_addr=0,
                                         memory_size=GUEST_MEM_SIZE, userspace_addr=addr)
    fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, bytes(region))
    rec["stage"] = "KVM_CREATE_VCPU"
    vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
    fds.append(vcpu)
    rec["stage"] = "KVM_GET_VCPU_MMAP_SIZE"
    run_size = fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0)
    rec["stage"] = "mmap kvm_run"
    run = mmap.mmap(vcpu, run_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    maps.append(run)
    rec["stage"] = "KVM_GET_SREGS"
    sregs = kvm_sregs()
    fcntl.ioctl(vcpu, KVM_GET_SREGS, sregs, True)
    sregs.cs.base, sregs.cs.selector = 0, 0
    rec["stage"] = "KVM_SET_SREGS"
    fcntl.ioctl(vcpu, KVM_SET_SREGS, bytes(sregs))
    rec["stage"] = "KVM_SET_REGS"
    fcntl.ioctl(vcpu, KVM_SET_REGS, bytes(kvm_regs(rip=GUEST_LOAD_ADDR, rbx=nonce, rflags=0x2)))
    return vcpu, run


def _run_vcpu(vcpu: int, run: mmap.mmap, rec: dict[str, Any], max_runs: int) -> None:
    """KVM_RUN until HLT or an unexpected exit; ok only after the expected OUT, then HLT."""
    saw_out = False
    for _ in range(max_runs):
        rec["stage"] = "KVM_RUN"
        try:
            fcntl.ioctl(vcpu, KVM_RUN, 0)
        except OSError as e:
            if e.errno == errno.EINTR:
                rec["runs"].append({"exit_name": "EINTR (retried)"})
                continue
            raise
        ex = _decode_exit(run)
        rec["runs"].append(ex)
        reason = ex["exit_reason"]
        if reason == KVM_EXIT_INTR:
            continue
        if reason == KVM_EXIT_IO and not saw_out:
            exp = rec["expected"]
            if (ex.get("direction") == "out" and ex.get("port") == exp["port"]
                    and ex.get("size") == exp["size"] and ex.get("value") == exp["value"]):
                saw_out = True
                continue
            break  # unexpected I/O
        if reason == KVM_EXIT_HLT:
            rec["ok"] = saw_out
        break  # HLT or any other exit ends the guest


def _read_after(vcpu: int, rec: dict[str, Any]) -> None:
    """The final rip and the vCPU's counters (each best effort)."""
    rec["stage"] = "done"
    try:
        regs_after = kvm_regs()
        fcntl.ioctl(vcpu, KVM_GET_REGS, regs_after, True)
        rec["final_rip"] = hex(regs_after.rip)
    except OSError:
        pass
    try:
        st = vcpu_stats(vcpu)
        rec["stats"] = {k: st[k] for k in ("exits", "io_exits", "halt_exits",
                                           "insn_emulation", "insn_emulation_fail") if k in st}
    except OSError as e:
        rec["stats"] = None
        rec["stats_error"] = errno.errorcode.get(e.errno or 0, str(e.errno))


def _run_guest(kvm: int, name: str, code: bytes, nonce: int, expected: int, n_insns: int,
               max_runs: int = 16) -> dict[str, Any]:
    """Run one guest in a fresh VM; return its record (see run_probe)."""
    rec: dict[str, Any] = {"guest": name, "ok": False, "stage": "KVM_CREATE_VM", "runs": [],
                           "error": None, "nonce": nonce, "instructions": n_insns,
                           "expected": {"port": PROBE_PORT, "size": 2, "value": expected}}
    fds: list[int] = []
    maps: list[mmap.mmap] = []
    try:
        vcpu, run = _setup_vcpu(kvm, code, nonce, rec, fds, maps)
        _run_vcpu(vcpu, run, rec, max_runs)
        _read_after(vcpu, rec)
    except OSError as e:
        rec["error"] = {"stage": rec["stage"],
                        "errno": errno.errorcode.get(e.errno or 0, e.errno),
                        "strerror": e.strerror}
    finally:
        for m in maps:
            m.close()
        for fd in reversed(fds):
            os.close(fd)
    return rec


def run_probe(path: str = DEV_KVM) -> dict[str, Any]:
    """Open /dev/kvm, check the API version, run the basic and the workload guest.

    Returns {"api_version", "error": {"stage","errno","strerror"} | None,
             "guests": [record, ...]} where each record has "ok", "stage", "runs" (decoded exits),
    "expected", "instructions" (executed by a correct run), "stats" (vCPU counters: exits,
    insn_emulation, ...) or None. A guest is ok only when the vCPU produced the expected OUT
    value and then KVM_EXIT_HLT."""
    out: dict[str, Any] = {"api_version": None, "error": None, "guests": []}
    try:
        kvm = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        out["error"] = {"stage": "open", "errno": errno.errorcode.get(e.errno or 0, e.errno),
                        "strerror": e.strerror}
        return out
    try:
        try:
            out["api_version"] = fcntl.ioctl(kvm, KVM_GET_API_VERSION, 0)
        except OSError as e:
            out["error"] = {"stage": "KVM_GET_API_VERSION",
                            "errno": errno.errorcode.get(e.errno or 0, e.errno),
                            "strerror": e.strerror}
            return out
        if out["api_version"] != KVM_API_VERSION:
            out["error"] = {"stage": "KVM_GET_API_VERSION", "errno": None,
                            "strerror": f"API version {out['api_version']}, expected 12"}
            return out
        for name, make in (("basic", basic_guest), ("workload", workload_guest)):
            nonce = random.randrange(0x101, 0x7FFF)
            code, expected, n = make(nonce)
            out["guests"].append(_run_guest(kvm, name, code, nonce, expected, n))
            if out["guests"][-1]["error"]:
                break
    finally:
        os.close(kvm)
    return out


def _main(argv: list[str]) -> int:
    if argv[:1] == ["--probe-child"]:
        path = argv[1] if len(argv) > 1 else DEV_KVM
        print(json.dumps(run_probe(path)), flush=True)
        return 0
    if argv[:1] == ["--facts"]:
        print(json.dumps(api_facts()), flush=True)
        return 0
    print("usage: python3 -m kvmlab.host.kvmapi --probe-child [DEV] | --facts", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
