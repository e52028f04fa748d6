"""KVM ioctl numbers, computed the way the kernel computes them, and a decoder for traced calls.

Every number below is built with ``_IO``/``_IOR``/``_IOW``/``_IOWR`` (asm-generic/ioctl.h, the
encoding kvmlab.host.kvmapi already implements) from KVMIO = 0xAE, the request number and the
size of the argument structure on x86-64, exactly as written in include/uapi/linux/kvm.h (the
0.12 tree carries the same definitions in kvm/include/linux/kvm.h). Each table row names its
macro there. Capability numbers are ``KVM_CAP_*`` of the same header.

``decode(scope, number, arg)`` names a call (scope: "system" for /dev/kvm, "vm", "vcpu"); an
unknown number is kept and shown raw (``0xae99``), never dropped.
"""
from __future__ import annotations

import errno as errno_mod
import fcntl
import os
from dataclasses import dataclass

from kvmlab.host.kvmapi import _IOC_NONE, _IOC_READ, _IOC_WRITE, KVMIO, _ioc

assert KVMIO == 0xAE  # include/uapi/linux/kvm.h: #define KVMIO 0xAE
_IOC_RW = _IOC_READ | _IOC_WRITE


def _IO(nr: int) -> int:  # noqa: N802 - the kernel's macro names
    return _ioc(_IOC_NONE, nr, 0)


def _IOR(nr: int, size: int) -> int:  # noqa: N802
    return _ioc(_IOC_READ, nr, size)


def _IOW(nr: int, size: int) -> int:  # noqa: N802
    return _ioc(_IOC_WRITE, nr, size)


def _IOWR(nr: int, size: int) -> int:  # noqa: N802
    return _ioc(_IOC_RW, nr, size)


# sizeof() of the argument structures on x86-64 (include/uapi/linux/kvm.h and
# arch/x86/include/uapi/asm/kvm.h; field lists in the comments)
SIZES = {
    "__u64": 8,
    "kvm_msr_list": 4,                # __u32 nmsrs; __u32 indices[]
    "kvm_cpuid2": 8,                  # __u32 nent, padding; entries[]
    "kvm_memory_region": 24,          # __u32 slot, flags; __u64 guest_phys_addr, memory_size
    "kvm_userspace_memory_region": 32,  # + __u64 userspace_addr
    "kvm_dirty_log": 16,              # __u32 slot, padding; union { void *; __u64 }
    "kvm_memory_alias": 32,           # __u32 slot, flags; __u64 gpa, size, target_phys_addr
    "kvm_irq_level": 8,               # union { __u32 irq; __s32 status }; __u32 level
    "kvm_irqchip": 520,               # __u32 chip_id, pad; union { char dummy[512]; ... }
    "kvm_pit_state": 72,              # struct kvm_pit_channel_state channels[3] (24 each)
    "kvm_pit_state2": 112,            # channels[3]; __u32 flags; __u32 reserved[9]
    "kvm_coalesced_mmio_zone": 16,    # __u64 addr; __u32 size; __u32 pad
    "kvm_assigned_pci_dev": 64,       # __u32 id, busnr, devfn, flags, segnr; pad[11]
    "kvm_irq_routing": 8,             # __u32 nr, flags; entries[]
    "kvm_assigned_irq": 64,           # __u32 id, host_irq, guest_irq, flags; union pad[12]
    "kvm_irqfd": 32,                  # __u32 fd, gsi, flags, resamplefd; __u8 pad[16]
    "kvm_pit_config": 64,             # __u32 flags; __u32 pad[15]
    "kvm_ioeventfd": 64,              # __u64 datamatch, addr; __u32 len; __s32 fd; flags; pad[36]
    "kvm_clock_data": 48,             # __u64 clock; __u32 flags, pad0; __u64 realtime, tsc; ..
    "kvm_regs": 144,                  # 18 x __u64
    "kvm_sregs": 312,                 # 8 segments, 2 dtables, cr*, efer, apic_base, bitmap
    "kvm_translation": 24,            # __u64 linear, physical; __u8 valid, writeable, usermode
    "kvm_interrupt": 4,               # __u32 irq
    "kvm_msrs": 8,                    # __u32 nmsrs, pad; entries[]
    "kvm_cpuid": 8,                   # __u32 nent, padding; entries[]
    "kvm_signal_mask": 4,             # __u32 len; __u8 sigset[]
    "kvm_fpu": 416,                   # fpr[8][16], fcw.., xmm[16][16], mxcsr, pad2
    "kvm_lapic_state": 1024,          # char regs[KVM_APIC_REG_SIZE = 0x400]
    "kvm_tpr_access_ctl": 40,         # __u32 enabled, flags; __u32 reserved[8]
    "kvm_vapic_addr": 8,              # __u64 vapic_addr
    "kvm_mp_state": 4,                # __u32 mp_state
    "kvm_guest_debug": 72,            # __u32 control, pad; struct kvm_guest_debug_arch (8 x __u64)
    "kvm_x86_mce": 64,                # __u64 status, addr, misc, mcg_status; __u8 bank; pads
    "kvm_vcpu_events": 64,
    "kvm_debugregs": 128,             # __u64 db[4], dr6, dr7, flags; reserved[9]
    "kvm_xsave": 4096,                # __u32 region[1024]
    "kvm_xcrs": 392,                  # __u32 nr_xcrs, flags; kvm_xcr xcrs[16]; __u64 padding[16]
    "kvm_enable_cap": 104,            # __u32 cap, flags; __u64 args[4]; __u8 pad[64]
    "kvm_msi": 32,                    # __u32 address_lo, address_hi, data, flags, devid; pad[12]
    "kvm_one_reg": 16,                # __u64 id, addr
    "kvm_create_device": 12,          # __u32 type, fd, flags
    "kvm_device_attr": 24,            # __u32 flags, group; __u64 attr, addr
}

# (scope, macro, number). scope: system = /dev/kvm, vm = the VM fd, vcpu = a vCPU fd.
# Each line is the definition in include/uapi/linux/kvm.h (and kvm/include/linux/kvm.h of 0.12).
_S = SIZES
IOCTLS: list[tuple[str, str, int]] = [
    ("system", "KVM_GET_API_VERSION", _IO(0x00)),
    ("system", "KVM_CREATE_VM", _IO(0x01)),
    ("system", "KVM_GET_MSR_INDEX_LIST", _IOWR(0x02, _S["kvm_msr_list"])),
    ("system", "KVM_CHECK_EXTENSION", _IO(0x03)),
    ("system", "KVM_GET_VCPU_MMAP_SIZE", _IO(0x04)),
    ("system", "KVM_GET_SUPPORTED_CPUID", _IOWR(0x05, _S["kvm_cpuid2"])),
    ("system", "KVM_GET_EMULATED_CPUID", _IOWR(0x09, _S["kvm_cpuid2"])),
    ("system", "KVM_GET_MSR_FEATURE_INDEX_LIST", _IOWR(0x0a, _S["kvm_msr_list"])),
    ("vm", "KVM_SET_MEMORY_REGION", _IOW(0x40, _S["kvm_memory_region"])),
    ("vm", "KVM_CREATE_VCPU", _IO(0x41)),
    ("vm", "KVM_GET_DIRTY_LOG", _IOW(0x42, _S["kvm_dirty_log"])),
    ("vm", "KVM_SET_MEMORY_ALIAS", _IOW(0x43, _S["kvm_memory_alias"])),
    ("vm", "KVM_SET_NR_MMU_PAGES", _IO(0x44)),
    ("vm", "KVM_GET_NR_MMU_PAGES", _IO(0x45)),
    ("vm", "KVM_SET_USER_MEMORY_REGION", _IOW(0x46, _S["kvm_userspace_memory_region"])),
    ("vm", "KVM_SET_TSS_ADDR", _IO(0x47)),
    ("vm", "KVM_SET_IDENTITY_MAP_ADDR", _IOW(0x48, _S["__u64"])),
    ("vm", "KVM_CREATE_IRQCHIP", _IO(0x60)),
    ("vm", "KVM_IRQ_LINE", _IOW(0x61, _S["kvm_irq_level"])),
    ("vm", "KVM_GET_IRQCHIP", _IOWR(0x62, _S["kvm_irqchip"])),
    ("vm", "KVM_SET_IRQCHIP", _IOR(0x63, _S["kvm_irqchip"])),
    ("vm", "KVM_CREATE_PIT", _IO(0x64)),
    ("vm", "KVM_GET_PIT", _IOWR(0x65, _S["kvm_pit_state"])),
    ("vm", "KVM_SET_PIT", _IOR(0x66, _S["kvm_pit_state"])),
    ("vm", "KVM_IRQ_LINE_STATUS", _IOWR(0x67, _S["kvm_irq_level"])),
    ("vm", "KVM_REGISTER_COALESCED_MMIO", _IOW(0x67, _S["kvm_coalesced_mmio_zone"])),
    ("vm", "KVM_UNREGISTER_COALESCED_MMIO", _IOW(0x68, _S["kvm_coalesced_mmio_zone"])),
    ("vm", "KVM_ASSIGN_PCI_DEVICE", _IOR(0x69, _S["kvm_assigned_pci_dev"])),
    ("vm", "KVM_SET_GSI_ROUTING", _IOW(0x6a, _S["kvm_irq_routing"])),
    ("vm", "KVM_ASSIGN_DEV_IRQ", _IOW(0x70, _S["kvm_assigned_irq"])),
    ("vm", "KVM_REINJECT_CONTROL", _IO(0x71)),
    ("vm", "KVM_IRQFD", _IOW(0x76, _S["kvm_irqfd"])),
    ("vm", "KVM_CREATE_PIT2", _IOW(0x77, _S["kvm_pit_config"])),
    ("vm", "KVM_SET_BOOT_CPU_ID", _IO(0x78)),
    ("vm", "KVM_IOEVENTFD", _IOW(0x79, _S["kvm_ioeventfd"])),
    ("vm", "KVM_SET_CLOCK", _IOW(0x7b, _S["kvm_clock_data"])),
    ("vm", "KVM_GET_CLOCK", _IOR(0x7c, _S["kvm_clock_data"])),
    ("vm", "KVM_GET_PIT2", _IOR(0x9f, _S["kvm_pit_state2"])),
    ("vm", "KVM_SET_PIT2", _IOW(0xa0, _S["kvm_pit_state2"])),
    ("vm", "KVM_SET_TSC_KHZ", _IO(0xa2)),
    ("vm", "KVM_SIGNAL_MSI", _IOW(0xa5, _S["kvm_msi"])),
    ("vm", "KVM_CREATE_DEVICE", _IOWR(0xe0, _S["kvm_create_device"])),
    ("vcpu", "KVM_RUN", _IO(0x80)),
    ("vcpu", "KVM_GET_REGS", _IOR(0x81, _S["kvm_regs"])),
    ("vcpu", "KVM_SET_REGS", _IOW(0x82, _S["kvm_regs"])),
    ("vcpu", "KVM_GET_SREGS", _IOR(0x83, _S["kvm_sregs"])),
    ("vcpu", "KVM_SET_SREGS", _IOW(0x84, _S["kvm_sregs"])),
    ("vcpu", "KVM_TRANSLATE", _IOWR(0x85, _S["kvm_translation"])),
    ("vcpu", "KVM_INTERRUPT", _IOW(0x86, _S["kvm_interrupt"])),
    ("vcpu", "KVM_GET_MSRS", _IOWR(0x88, _S["kvm_msrs"])),
    ("vcpu", "KVM_SET_MSRS", _IOW(0x89, _S["kvm_msrs"])),
    ("vcpu", "KVM_SET_CPUID", _IOW(0x8a, _S["kvm_cpuid"])),
    ("vcpu", "KVM_SET_SIGNAL_MASK", _IOW(0x8b, _S["kvm_signal_mask"])),
    ("vcpu", "KVM_GET_FPU", _IOR(0x8c, _S["kvm_fpu"])),
    ("vcpu", "KVM_SET_FPU", _IOW(0x8d, _S["kvm_fpu"])),
    ("vcpu", "KVM_GET_LAPIC", _IOR(0x8e, _S["kvm_lapic_state"])),
    ("vcpu", "KVM_SET_LAPIC", _IOW(0x8f, _S["kvm_lapic_state"])),
    ("vcpu", "KVM_SET_CPUID2", _IOW(0x90, _S["kvm_cpuid2"])),
    ("vcpu", "KVM_GET_CPUID2", _IOWR(0x91, _S["kvm_cpuid2"])),
    ("vcpu", "KVM_TPR_ACCESS_REPORTING", _IOWR(0x92, _S["kvm_tpr_access_ctl"])),
    ("vcpu", "KVM_SET_VAPIC_ADDR", _IOW(0x93, _S["kvm_vapic_addr"])),
    ("vcpu", "KVM_GET_MP_STATE", _IOR(0x98, _S["kvm_mp_state"])),
    ("vcpu", "KVM_SET_MP_STATE", _IOW(0x99, _S["kvm_mp_state"])),
    ("vcpu", "KVM_NMI", _IO(0x9a)),
    ("vcpu", "KVM_SET_GUEST_DEBUG", _IOW(0x9b, _S["kvm_guest_debug"])),
    ("vcpu", "KVM_X86_SETUP_MCE", _IOW(0x9c, _S["__u64"])),
    ("vcpu", "KVM_X86_GET_MCE_CAP_SUPPORTED", _IOR(0x9d, _S["__u64"])),
    ("vcpu", "KVM_X86_SET_MCE", _IOW(0x9e, _S["kvm_x86_mce"])),
    ("vcpu", "KVM_GET_VCPU_EVENTS", _IOR(0x9f, _S["kvm_vcpu_events"])),
    ("vcpu", "KVM_SET_VCPU_EVENTS", _IOW(0xa0, _S["kvm_vcpu_events"])),
    ("vcpu", "KVM_GET_DEBUGREGS", _IOR(0xa1, _S["kvm_debugregs"])),
    ("vcpu", "KVM_SET_DEBUGREGS", _IOW(0xa2, _S["kvm_debugregs"])),
    ("vcpu", "KVM_ENABLE_CAP", _IOW(0xa3, _S["kvm_enable_cap"])),
    ("vcpu", "KVM_GET_XSAVE", _IOR(0xa4, _S["kvm_xsave"])),
    ("vcpu", "KVM_SET_XSAVE", _IOW(0xa5, _S["kvm_xsave"])),
    ("vcpu", "KVM_GET_XCRS", _IOR(0xa6, _S["kvm_xcrs"])),
    ("vcpu", "KVM_SET_XCRS", _IOW(0xa7, _S["kvm_xcrs"])),
    ("vcpu", "KVM_GET_ONE_REG", _IOW(0xab, _S["kvm_one_reg"])),
    ("vcpu", "KVM_SET_ONE_REG", _IOW(0xac, _S["kvm_one_reg"])),
    ("vcpu", "KVM_KVMCLOCK_CTRL", _IO(0xad)),
    ("vcpu", "KVM_GET_STATS_FD", _IO(0xce)),
    ("vcpu", "KVM_SET_DEVICE_ATTR", _IOW(0xe1, _S["kvm_device_attr"])),
    ("vcpu", "KVM_GET_DEVICE_ATTR", _IOW(0xe2, _S["kvm_device_attr"])),
    ("vcpu", "KVM_HAS_DEVICE_ATTR", _IOW(0xe3, _S["kvm_device_attr"])),
]
# KVM_CHECK_EXTENSION, KVM_ENABLE_CAP, KVM_GET_STATS_FD also work on other fds than listed
_ANY_SCOPE = {"KVM_CHECK_EXTENSION", "KVM_ENABLE_CAP", "KVM_GET_STATS_FD", "KVM_SET_DEVICE_ATTR",
              "KVM_GET_DEVICE_ATTR", "KVM_HAS_DEVICE_ATTR", "KVM_SET_TSC_KHZ"}

# KVM_CAP_* (include/uapi/linux/kvm.h): the argument of KVM_CHECK_EXTENSION
CAPS: dict[int, str] = {
    0: "IRQCHIP", 1: "HLT", 2: "MMU_SHADOW_CACHE_CONTROL", 3: "USER_MEMORY", 4: "SET_TSS_ADDR",
    6: "VAPIC", 7: "EXT_CPUID", 8: "CLOCKSOURCE", 9: "NR_VCPUS", 10: "NR_MEMSLOTS", 11: "PIT",
    12: "NOP_IO_DELAY", 13: "PV_MMU", 14: "MP_STATE", 15: "COALESCED_MMIO", 16: "SYNC_MMU",
    18: "IOMMU", 21: "DESTROY_MEMORY_REGION_WORKS", 22: "USER_NMI", 23: "SET_GUEST_DEBUG",
    24: "REINJECT_CONTROL", 25: "IRQ_ROUTING", 26: "IRQ_INJECT_STATUS", 29: "ASSIGN_DEV_IRQ",
    30: "JOIN_MEMORY_REGIONS_WORKS", 31: "MCE", 32: "IRQFD", 33: "PIT2", 34: "SET_BOOT_CPU_ID",
    35: "PIT_STATE2", 36: "IOEVENTFD", 37: "SET_IDENTITY_MAP_ADDR", 38: "XEN_HVM",
    39: "ADJUST_CLOCK", 40: "INTERNAL_ERROR_DATA", 41: "VCPU_EVENTS", 44: "HYPERV",
    45: "HYPERV_VAPIC", 46: "HYPERV_SPIN", 47: "PCI_SEGMENT", 49: "INTR_SHADOW",
    50: "DEBUGREGS", 51: "X86_ROBUST_SINGLESTEP", 54: "ENABLE_CAP", 55: "XSAVE", 56: "XCRS",
    59: "ASYNC_PF", 60: "TSC_CONTROL", 61: "GET_TSC_KHZ", 66: "MAX_VCPUS", 70: "ONE_REG",
    72: "TSC_DEADLINE_TIMER", 74: "SYNC_REGS", 75: "PCI_2_3", 76: "KVMCLOCK_CTRL",
    77: "SIGNAL_MSI", 81: "READONLY_MEM", 82: "IRQFD_RESAMPLE",
}

_BY_NUMBER: dict[int, list[tuple[str, str]]] = {}
for _scope, _name, _nr in IOCTLS:
    _BY_NUMBER.setdefault(_nr, []).append((_scope, _name))
NUMBERS: dict[str, int] = {name: nr for _s, name, nr in IOCTLS}
SCOPES = ("system", "vm", "vcpu")


def ioctl_name(scope: str, number: int) -> str | None:
    """The KVM_* macro for ``number`` on an fd of ``scope``; None when the number is unknown."""
    cands = _BY_NUMBER.get(number, [])
    for s, name in cands:
        if s == scope or name in _ANY_SCOPE:
            return name
    return cands[0][1] if cands else None


def raw(number: int) -> str:
    return f"{number:#x}"


def cap_name(cap: int) -> str:
    name = CAPS.get(cap)
    return f"KVM_CAP_{name}" if name else f"cap {cap}"


def errno_name(code: int) -> str:
    return errno_mod.errorcode.get(code, f"errno {code}")


def errno_number(name: str) -> int | None:
    return getattr(errno_mod, name, None) if name.isupper() else None


@dataclass(frozen=True)
class Decoded:
    """One KVM ioctl as a person reads it."""
    name: str          # KVM_* or the raw number (0xae99) when unknown
    known: bool
    argument: str      # capability name, address, number, or the pointer strace showed


_ADDRESS_ARGS = {"KVM_SET_TSS_ADDR"}
# _IO calls whose third argument the kernel ignores (qemu-kvm 0.12 passes whatever is in rdx)
_NO_ARG = {"KVM_GET_API_VERSION", "KVM_CREATE_PIT", "KVM_CREATE_IRQCHIP", "KVM_RUN",
           "KVM_GET_VCPU_MMAP_SIZE", "KVM_NMI", "KVM_KVMCLOCK_CTRL", "KVM_GET_NR_MMU_PAGES"}
_POINTER_ARGS = {"KVM_SET_IDENTITY_MAP_ADDR"}   # a pointer to the __u64 address


def decode(scope: str, number: int, arg: str) -> Decoded:
    """Name and argument of an ioctl ``number`` made on an fd of ``scope`` with ``arg`` (the
    argument text as strace printed it with -X raw)."""
    name = ioctl_name(scope, number)
    if name is None:
        return Decoded(raw(number), False, arg)
    try:
        value = int(arg, 0)
    except ValueError:
        return Decoded(name, True, arg)
    if name == "KVM_CHECK_EXTENSION":
        return Decoded(name, True, cap_name(value))
    if name in _ADDRESS_ARGS:
        return Decoded(name, True, f"addr {value:#x}")
    if name in _POINTER_ARGS:
        return Decoded(name, True, f"&addr ({value:#x})")
    if name in _NO_ARG:
        return Decoded(name, True, "-")
    if name == "KVM_CREATE_VM":
        return Decoded(name, True, f"type {value}")
    if name in ("KVM_CREATE_VCPU", "KVM_SET_BOOT_CPU_ID"):
        return Decoded(name, True, f"vcpu {value}")
    return Decoded(name, True, arg)


def pit_before_irqchip(dev: str = "/dev/kvm") -> int:
    """What qemu-kvm 0.12's start asks first of a new VM (kvm_arch_create): KVM_CREATE_PIT before
    any KVM_CREATE_IRQCHIP. 0 when the kernel accepts it, else the errno (ENOENT: this KVM wants
    the in-kernel PIC first, so 0.12 gives KVM up). OSError: no /dev/kvm or no VM."""
    kvm = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    try:
        vm = fcntl.ioctl(kvm, NUMBERS["KVM_CREATE_VM"], 0)
        try:
            fcntl.ioctl(vm, NUMBERS["KVM_CREATE_PIT"], 0)
            return 0
        except OSError as e:
            return e.errno or -1
        finally:
            os.close(vm)
    finally:
        os.close(kvm)
