"""CPU facts for virtualization: CPUID, MSRs and the decoders for them (Intel SDM / AMD APM).

Sources, in order of preference:
- CPUID: the instruction itself, executed from a small mmap'd executable buffer through ctypes
  (x86-64 only); else /dev/cpu/0/cpuid (root); else /proc/cpuinfo flags. Every result says which.
- MSRs: /dev/cpu/N/msr (root + the msr driver; ``modprobe msr`` is tried when it is missing).

The decoders are pure functions over integers so that they can be tested with values printed by
real processors.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmlab.core import proc
from kvmlab.core.errors import KvmlabError

# ---------------------------------------------------------------------------------------------
# CPUID


@dataclass(frozen=True)
class Cpuid:
    eax: int
    ebx: int
    ecx: int
    edx: int


# x86-64 SysV: void f(uint32 leaf /*edi*/, uint32 subleaf /*esi*/, uint32 out[4] /*rdx*/)
_CPUID_CODE = bytes([
    0x53,                    # push rbx            (callee-saved, cpuid clobbers it)
    0x89, 0xF8,              # mov eax, edi
    0x89, 0xF1,              # mov ecx, esi
    0x49, 0x89, 0xD0,        # mov r8, rdx
    0x0F, 0xA2,              # cpuid
    0x41, 0x89, 0x00,        # mov [r8], eax
    0x41, 0x89, 0x58, 0x04,  # mov [r8+4], ebx
    0x41, 0x89, 0x48, 0x08,  # mov [r8+8], ecx
    0x41, 0x89, 0x50, 0x0C,  # mov [r8+12], edx
    0x5B,                    # pop rbx
    0xC3,                    # ret
])

_cpuid_fn: Any = None
_cpuid_buf: mmap.mmap | None = None


def _native_cpuid() -> Any:
    """A ctypes function executing CPUID (None when not x86-64 or exec mappings are refused)."""
    global _cpuid_fn, _cpuid_buf
    if _cpuid_fn is not None:
        return _cpuid_fn
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        buf = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                        prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError):
        return None
    buf.write(_CPUID_CODE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    proto = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32,
                             ctypes.POINTER(ctypes.c_uint32 * 4))
    _cpuid_buf, _cpuid_fn = buf, proto(addr)
    return _cpuid_fn


def cpuid(leaf: int, subleaf: int = 0) -> tuple[Cpuid, str]:
    """Execute CPUID; returns (registers, source). Raises OSError when no source works."""
    fn = _native_cpuid()
    if fn is not None:
        out = (ctypes.c_uint32 * 4)()
        fn(leaf, subleaf, ctypes.byref(out))
        return Cpuid(*out), "cpuid instruction"
    fd = os.open("/dev/cpu/0/cpuid", os.O_RDONLY)
    try:
        data = os.pread(fd, 16, (subleaf << 32) | leaf)
    finally:
        os.close(fd)
    return Cpuid(*struct.unpack("<4I", data)), "/dev/cpu/0/cpuid"


def vendor_from_cpuid0(r: Cpuid) -> str:
    return struct.pack("<3I", r.ebx, r.edx, r.ecx).decode("ascii", "replace")


def signature(r: Cpuid) -> str:
    """The 12-byte signature in EBX, ECX, EDX (hypervisor leaf 0x40000000 order)."""
    return struct.pack("<3I", r.ebx, r.ecx, r.edx).decode("ascii", "replace").rstrip("\0")


HYPERVISORS = {
    "KVMKVMKVM": "KVM", "Microsoft Hv": "Microsoft Hyper-V", "VMwareVMware": "VMware",
    "XenVMMXenVMM": "Xen", "TCGTCGTCGTCG": "QEMU TCG", "VBoxVBoxVBox": "VirtualBox",
    " lrpepyh  vr": "Parallels", "bhyve bhyve ": "bhyve", "ACRNACRNACRN": "ACRN",
    "QNXQVMBSQG": "QNX Hypervisor", "Jailhouse": "Jailhouse", "GenuineIntel": "Intel (no PV)",
}


def family_model(eax: int) -> tuple[int, int, int]:
    """(display family, display model, stepping) from CPUID.1:EAX (SDM Vol. 2A, CPUID)."""
    stepping = eax & 0xF
    model = (eax >> 4) & 0xF
    family = (eax >> 8) & 0xF
    ext_model = (eax >> 16) & 0xF
    ext_family = (eax >> 20) & 0xFF
    if family == 0xF:
        family += ext_family
    if family in (0x6, 0xF) or (eax >> 8) & 0xF == 0xF:
        model += ext_model << 4
    return family, model, stepping


def decode_leaf1(ecx: int) -> dict[str, bool]:
    """CPUID.1:ECX bits that matter here: VMX (5), SMX (6), hypervisor (31)."""
    return {"vmx": bool(ecx >> 5 & 1), "smx": bool(ecx >> 6 & 1),
            "hypervisor": bool(ecx >> 31 & 1)}


def decode_ext1(ecx: int) -> dict[str, bool]:
    """CPUID.80000001h:ECX bit 2 = SVM (AMD APM Vol. 3)."""
    return {"svm": bool(ecx >> 2 & 1)}


def cpuinfo_flags(text: str | None = None) -> tuple[dict[str, str], set[str]]:
    """(first processor's key/values, its flags) from /proc/cpuinfo."""
    if text is None:
        text = Path("/proc/cpuinfo").read_text()
    first = text.split("\n\n", 1)[0]
    kv: dict[str, str] = {}
    for line in first.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            kv[k.strip()] = v.strip()
    return kv, set(kv.get("flags", "").split())


def cpu_identity() -> dict[str, Any]:
    """Vendor, brand, family/model/stepping, VMX/SVM/hypervisor bits, hypervisor vendor.

    Keys: vendor, brand, family, model, stepping, vmx, svm, smx, hypervisor, hypervisor_vendor,
    hypervisor_signature, source ("cpuid instruction" | "/dev/cpu/0/cpuid" | "/proc/cpuinfo").
    """
    try:
        r0, src = cpuid(0)
        r1, _ = cpuid(1)
        rx, _ = cpuid(0x80000000)
        info: dict[str, Any] = {"source": src, "vendor": vendor_from_cpuid0(r0)}
        fam, mod, step = family_model(r1.eax)
        info.update(family=fam, model=mod, stepping=step, **decode_leaf1(r1.ecx))
        info["leaf1_ecx"] = r1.ecx
        info["ext1_ecx"] = cpuid(0x80000001)[0].ecx if rx.eax >= 0x80000001 else 0
        info.update(decode_ext1(info["ext1_ecx"]))
        if rx.eax >= 0x80000004:
            raw = b"".join(struct.pack("<4I", *(lambda c: (c.eax, c.ebx, c.ecx, c.edx))(
                cpuid(leaf)[0])) for leaf in (0x80000002, 0x80000003, 0x80000004))
            info["brand"] = raw.split(b"\0")[0].decode("ascii", "replace").strip()
        info["hypervisor_signature"] = info["hypervisor_vendor"] = None
        if info["hypervisor"]:
            sig = signature(cpuid(0x40000000)[0])
            info["hypervisor_signature"] = sig
            info["hypervisor_vendor"] = HYPERVISORS.get(sig, f"unknown ({sig!r})")
        return info
    except OSError as e:
        kv, flags = cpuinfo_flags()
        return {"source": f"/proc/cpuinfo (CPUID not readable: {e.strerror or e})",
                "vendor": kv.get("vendor_id", "?"), "brand": kv.get("model name", "?"),
                "family": int(kv.get("cpu family", "0") or 0),
                "model": int(kv.get("model", "0") or 0),
                "stepping": int(kv.get("stepping", "0") or 0) if kv.get("stepping", "0").isdigit()
                else 0,
                "vmx": "vmx" in flags, "svm": "svm" in flags, "smx": "smx" in flags,
                "hypervisor": "hypervisor" in flags, "hypervisor_vendor": None,
                "hypervisor_signature": None}


def kvm_backends(vendor: str, leaf1_ecx: int, ext1_ecx: int) -> dict[str, Any]:
    """Which KVM vendor module can work on this CPU, from CPUID alone (not from the vendor
    string: under emulation, e.g. qemu TCG ``-cpu max``, the vendor and the extension offered
    need not match): kvm_intel needs VMX (CPUID.1:ECX[5]), kvm_amd needs SVM
    (CPUID.80000001h:ECX[2]). Returns {"vmx", "svm", "module" (or None), "refused": {module:
    why}} where "refused" explains each module the kernel will refuse to load."""
    vmx, svm = decode_leaf1(leaf1_ecx)["vmx"], decode_ext1(ext1_ecx)["svm"]
    refused: dict[str, str] = {}
    if not vmx:
        refused["kvm_intel"] = (f"VMX absent: CPUID.1:ECX = {leaf1_ecx:#010x}, bit 5 (VMX) is 0, "
                                "so kvm_intel refuses to load (\"kvm: no hardware support for "
                                "'kvm_intel'\", EOPNOTSUPP)")
    if not svm:
        refused["kvm_amd"] = (f"SVM absent: CPUID.80000001h:ECX = {ext1_ecx:#010x}, bit 2 (SVM) "
                              "is 0, so kvm_amd refuses to load (\"kvm: no hardware support for "
                              "'kvm_amd'\")")
    module = "kvm_intel" if vmx and (not svm or vendor != "AuthenticAMD") else \
        ("kvm_amd" if svm else None)
    return {"vmx": vmx, "svm": svm, "vendor": vendor, "module": module, "refused": refused}


def module_vendor(ident: dict[str, Any]) -> str:
    """The vendor whose KVM module fits the extension CPUID offers: AuthenticAMD when only SVM
    is there (whatever the vendor string says), GenuineIntel when only VMX is, else the
    vendor string."""
    vmx, svm = bool(ident.get("vmx")), bool(ident.get("svm"))
    if svm and not vmx:
        return "AuthenticAMD"
    if vmx and not svm:
        return "GenuineIntel"
    return str(ident.get("vendor", ""))


# ---------------------------------------------------------------------------------------------
# MSRs

IA32_FEATURE_CONTROL = 0x3A
IA32_VMX_BASIC = 0x480
IA32_VMX_PINBASED_CTLS = 0x481
IA32_VMX_PROCBASED_CTLS = 0x482
IA32_VMX_EXIT_CTLS = 0x483
IA32_VMX_ENTRY_CTLS = 0x484
IA32_VMX_PROCBASED_CTLS2 = 0x48B
MSR_VM_CR = 0xC0010114  # AMD


class MsrUnavailable(Exception):
    """An MSR cannot be read; .reason is user-facing, .needs_root tells why."""

    def __init__(self, reason: str, needs_root: bool = False):
        super().__init__(reason)
        self.reason, self.needs_root = reason, needs_root


def ensure_msr_device(cpu: int = 0) -> Path:
    """/dev/cpu/N/msr, loading the msr driver when absent and possible; raises MsrUnavailable."""
    dev = Path(f"/dev/cpu/{cpu}/msr")
    if dev.exists():
        return dev
    if not Path("/proc/modules").exists():
        raise MsrUnavailable(f"{dev} does not exist: the kernel has no msr driver "
                             "(CONFIG_X86_MSR is not set) and no loadable-module support")
    if os.geteuid() != 0:
        raise MsrUnavailable(f"{dev} does not exist and loading the msr driver needs root",
                             needs_root=True)
    try:
        p = proc.run(["modprobe", "msr"], timeout=30)
    except (OSError, KvmlabError) as e:
        raise MsrUnavailable(f"{dev} does not exist and `modprobe msr` failed: {e}") from None
    if p.returncode != 0 or not dev.exists():
        raise MsrUnavailable(f"{dev} does not exist and `modprobe msr` failed: "
                             f"{(p.stderr or p.stdout).strip()[:200]}")
    return dev


def read_msr(index: int, cpu: int = 0) -> int:
    dev = ensure_msr_device(cpu)
    try:
        fd = os.open(dev, os.O_RDONLY)
    except PermissionError:
        raise MsrUnavailable(f"{dev}: permission denied (needs root and CAP_SYS_RAWIO)",
                             needs_root=True) from None
    try:
        data = os.pread(fd, 8, index)
    except OSError as e:
        if e.errno == errno.EIO:
            raise MsrUnavailable(f"MSR {index:#x} is not implemented on this CPU "
                                 "(rdmsr raised #GP)") from None
        raise MsrUnavailable(f"reading MSR {index:#x}: {e.strerror}") from None
    finally:
        os.close(fd)
    return struct.unpack("<Q", data)[0]


def decode_feature_control(v: int) -> dict[str, Any]:
    """IA32_FEATURE_CONTROL (MSR 0x3A, SDM Vol. 3C 24.7 "Enabling and entering VMX operation").

    bit 0 lock, bit 1 VMXON inside SMX, bit 2 VMXON outside SMX, bits 14:8 SENTER enables,
    bit 15 SENTER global enable, bit 17 SGX launch control, bit 18 SGX global enable,
    bit 20 LMCE. KVM refuses to load when (v & 5) == 1: locked with VMX off outside SMX.
    """
    lock, inside, outside = bool(v & 1), bool(v & 2), bool(v & 4)
    if (v & 5) == 1:
        state, status = "disabled in firmware (locked with VMXON outside SMX off)", "fail"
    elif lock and outside:
        state, status = "enabled and locked by firmware", "ok"
    elif not lock:
        state, status = "unlocked (the kernel enables VMX and locks it when kvm_intel loads)", "ok"
    else:
        state, status = "locked", "warn"
    return {"value": hex(v), "lock": lock, "vmxon_inside_smx": inside,
            "vmxon_outside_smx": outside, "senter_global": bool(v >> 15 & 1),
            "sgx_launch_control": bool(v >> 17 & 1), "sgx_global": bool(v >> 18 & 1),
            "lmce": bool(v >> 20 & 1), "state": state, "status": status}


def decode_vm_cr(v: int) -> dict[str, Any]:
    """AMD VM_CR (MSR 0xC0010114, APM Vol. 2 15.30.1): bit 3 LOCK, bit 4 SVMDIS."""
    lock, svmdis = bool(v >> 3 & 1), bool(v >> 4 & 1)
    if svmdis:
        state, status = ("disabled in firmware (SVMDIS set" + (", locked)" if lock else ")"),
                         "fail")
    else:
        state, status = "SVM enabled", "ok"
    return {"value": hex(v), "lock": lock, "svmdis": svmdis, "state": state, "status": status}


MEMORY_TYPES = {0: "UC (uncacheable)", 6: "WB (write-back)"}


def decode_vmx_basic(v: int) -> dict[str, Any]:
    """IA32_VMX_BASIC (MSR 0x480, SDM Vol. 3D A.1)."""
    return {
        "value": hex(v),
        "vmcs_revision_id": v & 0x7FFFFFFF,
        "vmcs_size": (v >> 32) & 0x1FFF,
        "phys_addr_32bit_only": bool(v >> 48 & 1),
        "dual_monitor_smm": bool(v >> 49 & 1),
        "vmcs_memory_type": MEMORY_TYPES.get((v >> 50) & 0xF, f"{(v >> 50) & 0xF} (reserved)"),
        "ins_outs_exit_info": bool(v >> 54 & 1),
        "true_controls": bool(v >> 55 & 1),
        "no_error_code_required": bool(v >> 56 & 1),
    }


# Control names as in SDM Vol. 3C chapter 25.6-25.8 (tables "Definitions of ... Controls").
PIN_BASED = {0: "External-interrupt exiting", 3: "NMI exiting", 5: "Virtual NMIs",
             6: "Activate VMX-preemption timer", 7: "Process posted interrupts"}
PROC_BASED = {
    2: "Interrupt-window exiting", 3: "Use TSC offsetting", 7: "HLT exiting",
    9: "INVLPG exiting", 10: "MWAIT exiting", 11: "RDPMC exiting", 12: "RDTSC exiting",
    15: "CR3-load exiting", 16: "CR3-store exiting", 17: "Activate tertiary controls",
    19: "CR8-load exiting", 20: "CR8-store exiting", 21: "Use TPR shadow",
    22: "NMI-window exiting", 23: "MOV-DR exiting", 24: "Unconditional I/O exiting",
    25: "Use I/O bitmaps", 27: "Monitor trap flag", 28: "Use MSR bitmaps",
    29: "MONITOR exiting", 30: "PAUSE exiting", 31: "Activate secondary controls",
}
PROC_BASED2 = {
    0: "Virtualize APIC accesses", 1: "Enable EPT", 2: "Descriptor-table exiting",
    3: "Enable RDTSCP", 4: "Virtualize x2APIC mode", 5: "Enable VPID", 6: "WBINVD exiting",
    7: "Unrestricted guest", 8: "APIC-register virtualization", 9: "Virtual-interrupt delivery",
    10: "PAUSE-loop exiting", 11: "RDRAND exiting", 12: "Enable INVPCID",
    13: "Enable VM functions", 14: "VMCS shadowing", 15: "Enable ENCLS exiting",
    16: "RDSEED exiting", 17: "Enable PML", 18: "EPT-violation #VE",
    19: "Conceal VMX from PT", 20: "Enable XSAVES/XRSTORS", 21: "PASID translation",
    22: "Mode-based execute control for EPT", 23: "Sub-page write permissions for EPT",
    24: "Intel PT uses guest physical addresses", 25: "Use TSC scaling",
    26: "Enable user wait and pause", 27: "Enable PCONFIG", 28: "Enable ENCLV exiting",
    30: "VMM bus-lock detection", 31: "Instruction timeout",
}
EXIT_CTLS = {
    2: "Save debug controls", 9: "Host address-space size",
    12: "Load IA32_PERF_GLOBAL_CTRL", 15: "Acknowledge interrupt on exit", 18: "Save IA32_PAT",
    19: "Load IA32_PAT", 20: "Save IA32_EFER", 21: "Load IA32_EFER",
    22: "Save VMX-preemption timer value", 23: "Clear IA32_BNDCFGS", 24: "Conceal VMX from PT",
    25: "Clear IA32_RTIT_CTL", 26: "Clear IA32_LBR_CTL", 27: "Clear UINV",
    28: "Load CET state", 29: "Load PKRS", 30: "Save IA32_PERF_GLOBAL_CTL",
    31: "Activate secondary controls",
}
ENTRY_CTLS = {
    2: "Load debug controls", 9: "IA-32e mode guest", 10: "Entry to SMM",
    11: "Deactivate dual-monitor treatment", 13: "Load IA32_PERF_GLOBAL_CTRL",
    14: "Load IA32_PAT", 15: "Load IA32_EFER", 16: "Load IA32_BNDCFGS",
    17: "Conceal VMX from PT", 18: "Load IA32_RTIT_CTL", 19: "Load UINV",
    20: "Load CET state", 21: "Load guest IA32_LBR_CTL", 22: "Load PKRS",
}

CONTROL_MSRS: dict[int, tuple[str, dict[int, str]]] = {
    IA32_VMX_PINBASED_CTLS: ("IA32_VMX_PINBASED_CTLS", PIN_BASED),
    IA32_VMX_PROCBASED_CTLS: ("IA32_VMX_PROCBASED_CTLS", PROC_BASED),
    IA32_VMX_EXIT_CTLS: ("IA32_VMX_EXIT_CTLS", EXIT_CTLS),
    IA32_VMX_ENTRY_CTLS: ("IA32_VMX_ENTRY_CTLS", ENTRY_CTLS),
    IA32_VMX_PROCBASED_CTLS2: ("IA32_VMX_PROCBASED_CTLS2", PROC_BASED2),
}


def decode_controls(v: int, names: dict[int, str]) -> dict[str, Any]:
    """A VMX control capability MSR (SDM Vol. 3D A.3-A.5).

    Bits 31:0 are the allowed 0-settings (bit set: the control must be 1), bits 63:32 the allowed
    1-settings (bit clear: the control must be 0). Returns {"allowed0", "allowed1", "controls":
    [{"bit", "name", "setting": "must be 1" | "must be 0" | "0 or 1"}], "supported": [names that
    may be 1], "reserved_must_be_1": [bits]}.
    """
    allowed0, allowed1 = v & 0xFFFFFFFF, v >> 32
    controls = []
    for bit in range(32):
        must1, may1 = bool(allowed0 >> bit & 1), bool(allowed1 >> bit & 1)
        setting = "must be 1" if must1 else ("0 or 1" if may1 else "must be 0")
        if bit in names:
            controls.append({"bit": bit, "name": names[bit], "setting": setting})
    return {
        "value": hex(v), "allowed0": hex(allowed0), "allowed1": hex(allowed1),
        "controls": controls,
        "supported": [c["name"] for c in controls if c["setting"] != "must be 0"],
        "unsupported": [c["name"] for c in controls if c["setting"] == "must be 0"],
        "reserved_must_be_1": [b for b in range(32) if allowed0 >> b & 1 and b not in names],
    }


def read_vmx_capabilities(cpu: int = 0) -> dict[str, Any]:
    """Read and decode IA32_VMX_BASIC and the control MSRs; raises MsrUnavailable."""
    out: dict[str, Any] = {"IA32_VMX_BASIC": decode_vmx_basic(read_msr(IA32_VMX_BASIC, cpu))}
    procbased = None
    for index, (name, names) in CONTROL_MSRS.items():
        if index == IA32_VMX_PROCBASED_CTLS2 and procbased is not None and not procbased >> 63:
            out[name] = {"value": None, "note": "no secondary controls (bit 63 of 0x482 is 0)"}
            continue
        v = read_msr(index, cpu)
        if index == IA32_VMX_PROCBASED_CTLS:
            procbased = v
        out[name] = decode_controls(v, names)
    return out


def virt_support() -> dict[str, Any]:
    """Quick facts for the KVM probe: vmx, svm, source, firmware_disabled (True/False/None)."""
    ident = cpu_identity()
    facts: dict[str, Any] = {"vmx": ident.get("vmx"), "svm": ident.get("svm"),
                             "source": ident.get("source"), "firmware_disabled": None}
    try:
        if ident.get("vmx"):
            facts["firmware_disabled"] = (read_msr(IA32_FEATURE_CONTROL) & 5) == 1
        elif ident.get("svm"):
            facts["firmware_disabled"] = bool(read_msr(MSR_VM_CR) >> 4 & 1)
    except MsrUnavailable:
        pass
    return facts
