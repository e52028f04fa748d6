"""Decode VM-exit reasons (Intel VMX), KVM_EXIT_* codes and KVM internal-error suberrors.

``explain(text)`` accepts a number ("0x80000022", "34"), or a message as qemu prints it
("KVM internal error. Suberror: 1", "KVM: entry failed, hardware error 0x80000021",
"kvm: unhandled exit 80000021", "KVM_EXIT_SHUTDOWN", "Create kernel PIC irqchip failed"), and
returns an Explanation with the meaning and what to check next.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from kvmlab.core.errors import HostError
from kvmlab.host.kvmapi import KVM_EXITS, KVM_INTERNAL_ERRORS

# Intel SDM Vol. 3D, Appendix C "VMX Basic Exit Reasons" (Table C-1).
VMX_EXIT_REASONS: dict[int, str] = {
    0: "Exception or non-maskable interrupt (NMI)",
    1: "External interrupt",
    2: "Triple fault",
    3: "INIT signal",
    4: "Start-up IPI (SIPI)",
    5: "I/O system-management interrupt (SMI)",
    6: "Other SMI",
    7: "Interrupt window",
    8: "NMI window",
    9: "Task switch",
    10: "CPUID",
    11: "GETSEC",
    12: "HLT",
    13: "INVD",
    14: "INVLPG",
    15: "RDPMC",
    16: "RDTSC",
    17: "RSM",
    18: "VMCALL",
    19: "VMCLEAR",
    20: "VMLAUNCH",
    21: "VMPTRLD",
    22: "VMPTRST",
    23: "VMREAD",
    24: "VMRESUME",
    25: "VMWRITE",
    26: "VMXOFF",
    27: "VMXON",
    28: "Control-register accesses",
    29: "MOV DR",
    30: "I/O instruction",
    31: "RDMSR",
    32: "WRMSR",
    33: "VM-entry failure due to invalid guest state",
    34: "VM-entry failure due to MSR loading",
    36: "MWAIT",
    37: "Monitor trap flag",
    39: "MONITOR",
    40: "PAUSE",
    41: "VM-entry failure due to machine-check event",
    43: "TPR below threshold",
    44: "APIC access",
    45: "Virtualized EOI",
    46: "Access to GDTR or IDTR",
    47: "Access to LDTR or TR",
    48: "EPT violation",
    49: "EPT misconfiguration",
    50: "INVEPT",
    51: "RDTSCP",
    52: "VMX-preemption timer expired",
    53: "INVVPID",
    54: "WBINVD or WBNOINVD",
    55: "XSETBV",
    56: "APIC write",
    57: "RDRAND",
    58: "INVPCID",
    59: "VMFUNC",
    60: "ENCLS",
    61: "RDSEED",
    62: "Page-modification log full",
    63: "XSAVES",
    64: "XRSTORS",
    65: "PCONFIG",
    66: "SPP-related event",
    67: "UMWAIT",
    68: "TPAUSE",
    69: "LOADIWKEY",
    70: "ENCLV",
    72: "ENQCMD PASID translation failure",
    73: "ENQCMDS PASID translation failure",
    74: "Bus lock",
    75: "Instruction timeout",
    76: "SEAMCALL",
    77: "TDCALL",
    78: "RDMSRLIST",
    79: "WRMSRLIST",
}

_ENTRY_FAILURE_HINTS = "VM entry failed, so the guest never ran; "
VMX_NEXT_STEPS: dict[int, str] = {
    0: "the guest raised an exception intercepted by the hypervisor; look at the VM-exit "
       "interruption information (vector) and the guest RIP",
    2: "the guest crashed (triple fault): check the guest kernel/firmware; with qemu use "
       "`-d int,cpu_reset -no-reboot` to see the faults leading to it",
    12: "the guest executed HLT: normal when idle",
    28: "a guest MOV to/from CR0/CR3/CR4/CR8 was intercepted: normal under KVM",
    30: "guest port I/O: normal (qemu's device emulation handles it)",
    31: "guest RDMSR of an MSR KVM does not handle: check `dmesg` for 'unhandled rdmsr' and "
        "the kvm parameter ignore_msrs",
    32: "guest WRMSR of an MSR KVM does not handle: check `dmesg` for 'unhandled wrmsr' and "
        "the kvm parameter ignore_msrs",
    33: _ENTRY_FAILURE_HINTS + "check the guest-state area against SDM Vol. 3C 27.3.1 "
        "('Checks on the guest state area'): CR0/CR4 against IA32_VMX_CR0_FIXED0/1 (0x486/"
        "0x487) and IA32_VMX_CR4_FIXED0/1 (0x488/0x489), segment registers (a real-mode or "
        "big-real-mode guest needs the 'Unrestricted guest' control, see IA32_VMX_PROCBASED_"
        "CTLS2 0x48B and /sys/module/kvm_intel/parameters/unrestricted_guest), RFLAGS, "
        "activity and interruptibility state; KVM dumps the VMCS to dmesg with "
        "kvm_intel.dump_invalid_vmcs=1",
    34: _ENTRY_FAILURE_HINTS + "an MSR in the VM-entry MSR-load area could not be loaded: "
        "check IA32_VMX_ENTRY_CTLS (MSR 0x484, allowed 0/1 settings, e.g. 'Load IA32_EFER', "
        "'Load IA32_PAT'), the VM-entry MSR-load count and address in the VMCS, and the exit "
        "qualification (it holds the 1-based index of the failing entry); the MSR value must "
        "be valid for a WRMSR (reserved bits, canonical addresses)",
    41: _ENTRY_FAILURE_HINTS + "a machine-check event happened during VM entry: check the "
        "machine-check log (`journalctl -k | grep -i mce`, rasdaemon) and the hardware",
    48: "a guest access hit an EPT violation: normal for MMIO and lazily mapped memory; if it "
        "repeats forever check the memory slots qemu registered",
    49: "EPT misconfiguration: KVM uses it for fast MMIO; persistent ones point to a KVM bug",
    52: "the VMX-preemption timer expired: normal (KVM uses it for timers)",
}

# AMD SVM exit codes (APM Vol. 2 Appendix C), the ones qemu users meet.
SVM_EXIT_CODES: dict[int, str] = {
    0x40: "VMEXIT_EXCP0 (#DE)", 0x4E: "VMEXIT_EXCP14 (#PF)", 0x60: "VMEXIT_INTR",
    0x61: "VMEXIT_NMI", 0x64: "VMEXIT_VINTR", 0x72: "VMEXIT_CPUID", 0x78: "VMEXIT_HLT",
    0x7B: "VMEXIT_IOIO", 0x7C: "VMEXIT_MSR", 0x7F: "VMEXIT_SHUTDOWN", 0x81: "VMEXIT_VMMCALL",
    0x400: "VMEXIT_NPF (nested page fault)",
    0xFFFFFFFFFFFFFFFF: "VMEXIT_INVALID (VMRUN failed: invalid guest state in the VMCB)",
}

KVM_EXIT_MEANING: dict[str, str] = {
    "KVM_EXIT_UNKNOWN": "the hardware exited for a reason KVM does not know "
                        "(hardware_exit_reason holds the VMX/SVM code: decode it with --kind vmx)",
    "KVM_EXIT_EXCEPTION": "the guest raised an exception userspace must handle",
    "KVM_EXIT_IO": "the guest did port I/O; userspace (qemu) emulates the device",
    "KVM_EXIT_HLT": "the guest executed HLT with no in-kernel irqchip",
    "KVM_EXIT_MMIO": "the guest accessed memory-mapped I/O; userspace emulates it",
    "KVM_EXIT_SHUTDOWN": "the guest triple-faulted (VMX exit reason 2 / SVM shutdown): the "
                         "guest crashed; qemu resets it, or stops with -no-reboot",
    "KVM_EXIT_FAIL_ENTRY": "VM entry failed; hardware_entry_failure_reason is the VMX exit "
                           "reason (e.g. 0x80000021 invalid guest state): decode it here",
    "KVM_EXIT_INTR": "a signal interrupted KVM_RUN: normal, userspace retries",
    "KVM_EXIT_INTERNAL_ERROR": "KVM could not handle something; the suberror says what",
    "KVM_EXIT_SYSTEM_EVENT": "the guest asked for shutdown/reset/crash (PSCI, ACPI, ...)",
    "KVM_EXIT_X86_RDMSR": "userspace MSR filtering: the guest read an MSR userspace handles",
    "KVM_EXIT_X86_WRMSR": "userspace MSR filtering: the guest wrote an MSR userspace handles",
    "KVM_EXIT_DIRTY_RING_FULL": "the dirty-page ring is full; userspace must harvest it",
    "KVM_EXIT_X86_BUS_LOCK": "the guest caused a bus lock (split-lock detection)",
    "KVM_EXIT_NOTIFY": "the VMX notify window expired (guest stuck in microcode)",
    "KVM_EXIT_MEMORY_FAULT": "a guest access failed on private/shared memory attributes",
}

SUBERROR_MEANING: dict[int, tuple[str, str]] = {
    1: ("emulation failure: KVM's instruction emulator could not execute a guest instruction",
        "KVM emulates only what hardware virtualization leaves to it (MMIO, real mode without "
        "'unrestricted guest', paravirtual/nested setups). On a paravirtual or restricted "
        "/dev/kvm (e.g. kvm_pvm, gVisor-like sandboxes) every instruction of an unmodified "
        "guest goes through the emulator and it fails at the first unsupported one: run "
        "`invoke doctor` and use TCG (-accel tcg / qemu-kvm 0.12: -no-kvm). On real hardware "
        "look at the instruction bytes qemu prints (code=...) and the guest RIP"),
    2: ("simultaneous exceptions: an exception occurred while delivering another",
        "the guest's IDT/GDT or stack is broken (usually a crashing guest kernel)"),
    3: ("exception during event delivery (e.g. #PF while delivering an interrupt through the "
        "IDT) that KVM cannot handle",
        "often MMIO or unbacked memory under the guest's IDT/stack: check qemu's memory map "
        "and the guest kernel"),
    4: ("unexpected hardware exit reason: KVM received a VM exit it does not handle",
        "the data words hold the raw exit reason: decode it with `invoke explain-exit "
        "--kind vmx CODE`; update the host kernel"),
}


# qemu / qemu-kvm messages that are not a number: (pattern, name, meaning, next steps)
QEMU_MESSAGES: list[tuple[str, str, str, str]] = [
    (r"Create kernel PIC irqchip failed|Could not initialize KVM, will disable KVM support",
     "qemu-kvm could not set up KVM",
     "qemu-kvm 0.12 failed to create the in-kernel interrupt controller (KVM_CREATE_IRQCHIP "
     "path of its libkvm) or another KVM set-up ioctl, printed 'Could not initialize KVM, will "
     "disable KVM support' and went on under TCG: the guest runs, but emulated and slowly",
     "run `invoke doctor`: on a paravirtual/restricted /dev/kvm this is expected, pass -no-kvm "
     "to make TCG explicit; on a real KVM host try -no-kvm-irqchip and check `dmesg`"),
    (r"Could not access KVM kernel module: No such file or directory|"
     r"failed to initialize kvm: No such file or directory|/dev/kvm: No such file",
     "no /dev/kvm",
     "qemu could not open /dev/kvm: the kvm modules are not loaded or the CPU/firmware has "
     "virtualization off",
     "run `invoke doctor`, then `invoke load-modules`"),
    (r"Could not access KVM kernel module: Permission denied|"
     r"failed to initialize kvm: Permission denied|/dev/kvm: Permission denied",
     "permission denied on /dev/kvm",
     "the user running qemu may not open /dev/kvm",
     "add the user to the kvm group (usermod -aG kvm USER, then log in again) or run as root"),
    (r"failed to initialize kvm: Device or resource busy|KVM_CREATE_VM.*busy",
     "KVM busy",
     "KVM_CREATE_VM failed with EBUSY: another hypervisor (VirtualBox, VMware) has VMX/SVM "
     "switched on",
     "stop the other hypervisor's VMs / unload its kernel module"),
]


@dataclass
class Explanation:
    kind: str         # vmx | svm | kvm-exit | suberror | qemu (a message without a code)
    code: int
    name: str
    meaning: str
    next_steps: str
    details: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_VMX_RESERVED_BITS = 0x07FF0000 | 1 << 30


def explain_vmx(code: int) -> Explanation:
    """A full VM-exit reason field (SDM Vol. 3C 25.9.1): bits 15:0 basic reason, bit 27
    enclave mode, bit 28 pending MTF, bit 29 exit from VMX root operation, bit 31 VM-entry
    failure."""
    if code < 0 or code > 0xFFFFFFFF:
        raise HostError(f"{code:#x} is not a 32-bit VM-exit reason",
                        hint="VMX exit reasons are 32-bit; SVM codes need --kind svm")
    basic = code & 0xFFFF
    reserved_bits = code & _VMX_RESERVED_BITS
    if reserved_bits:
        raise HostError(f"{code:#x} sets reserved bits of the VM-exit reason field "
                        f"({reserved_bits:#x}; bits 16-26 and 30 are always 0)",
                        hint="check the value; VMX exit reasons look like 0x30 or 0x80000021")
    if basic not in VMX_EXIT_REASONS:
        top = max(VMX_EXIT_REASONS)
        what = (f"beyond the last one the SDM defines ({top})" if basic > top
                else "reserved (the SDM assigns it no meaning)")
        raise HostError(f"VMX basic exit reason {basic} ({basic:#x}) is {what}",
                        hint=f"VMX basic exit reasons are 0-{top}; an SVM exit code needs "
                             "--kind svm, a KVM_EXIT_* number --kind kvm-exit")
    details = [f"basic exit reason {basic} ({basic:#x})"]
    entry_failure = bool(code >> 31 & 1)
    if entry_failure:
        details.append("bit 31 set: VM-entry failure")
    if code >> 29 & 1:
        details.append("bit 29 set: VM exit from VMX root operation (SMM dual-monitor)")
    if code >> 28 & 1:
        details.append("bit 28 set: pending MTF VM exit")
    if code >> 27 & 1:
        details.append("bit 27 set: VM exit from enclave mode")
    name = VMX_EXIT_REASONS[basic]
    if entry_failure and basic not in (33, 34, 41):
        details.append("unusual: bit 31 is normally set only with reasons 33, 34 and 41")
    meaning = name + (" (the VM entry itself failed; the guest did not run)"
                      if entry_failure or basic in (33, 34, 41) else "")
    steps = VMX_NEXT_STEPS.get(basic, "a normal VM exit that KVM handles; interesting only if "
                                      "it repeats forever or precedes an error")
    return Explanation("vmx", code, f"VMX exit reason {basic}: {name}", meaning, steps, details)


def explain_svm(code: int) -> Explanation:
    name = SVM_EXIT_CODES.get(code & 0xFFFFFFFFFFFFFFFF)
    if name is None:
        if 0x40 <= code <= 0x5F:
            name = f"VMEXIT_EXCP{code - 0x40}"
        elif 0x00 <= code <= 0x1F:
            name = f"VMEXIT_CR{code & 0xF}_{'WRITE' if code & 0x10 else 'READ'}"
        else:
            raise HostError(f"{code:#x} is not an SVM exit code the APM defines",
                            hint="check the value (SVM exit codes: 0x0-0x403, -1 "
                                 "VMEXIT_INVALID); a VMX reason needs --kind vmx")
    steps = ("check the VMCB guest state (EFER.SVME, CR0/CR4, segment attributes); "
             "KVM logs it with kvm_amd.dump_invalid_vmcb=1" if code in (-1, 0xFFFFFFFFFFFFFFFF)
             else "a normal SVM intercept handled by KVM")
    return Explanation("svm", code, name, name, steps, [])


def explain_kvm_exit(code: int) -> Explanation:
    name = KVM_EXITS.get(code)
    if name is None:
        raise HostError(f"{code} is not a known KVM_EXIT_* code",
                        hint=f"known: 0..{max(KVM_EXITS)} (see <linux/kvm.h>)")
    meaning = KVM_EXIT_MEANING.get(name, "see the KVM API documentation (kvm_run.exit_reason)")
    steps = {
        "KVM_EXIT_INTERNAL_ERROR": "read the suberror (qemu prints 'Suberror: N'): "
                                   "`invoke explain-exit --kind suberror N`",
        "KVM_EXIT_FAIL_ENTRY": "decode the hardware entry failure reason with "
                               "`invoke explain-exit 0x8000002X`",
        "KVM_EXIT_SHUTDOWN": "boot the guest with qemu `-d int,cpu_reset -no-reboot` to see why "
                             "it triple-faulted",
    }.get(name, "normal exit handled by the VMM unless it is the last thing qemu printed")
    return Explanation("kvm-exit", code, name, meaning, steps, [])


def explain_suberror(code: int) -> Explanation:
    if code not in SUBERROR_MEANING:
        raise HostError(f"{code} is not a known KVM internal-error suberror",
                        hint="known: 1 emulation, 2 simultaneous exceptions, 3 delivery, "
                             "4 unexpected exit reason")
    meaning, steps = SUBERROR_MEANING[code]
    return Explanation("suberror", code, KVM_INTERNAL_ERRORS[code], meaning, steps,
                       ["KVM_EXIT_INTERNAL_ERROR (exit reason 17) with this suberror"])


KINDS = ("vmx", "svm", "kvm-exit", "suberror")


def parse_int(text: str) -> int:
    t = text.strip().lower().replace("_", "")
    try:
        if t.startswith(("0x", "-0x")):
            return int(t, 16)
        if re.fullmatch(r"-?\d+", t):
            return int(t, 10)
        if re.fullmatch(r"[0-9a-f]+h?", t) and re.search(r"[a-f]|h$", t):
            return int(t.rstrip("h"), 16)
    except ValueError:
        pass
    raise HostError(f"not a number: {text!r}",
                    hint="give a decimal or 0x-hex code, or qemu's message text in quotes")


def explain(text: str, kind: str = "auto") -> Explanation:
    """Decode a code or a qemu/KVM message (see module docstring)."""
    if kind not in ("auto", *KINDS):
        raise HostError(f"unknown kind {kind!r}", hint="one of: auto, " + ", ".join(KINDS))
    s = text.strip()
    if not s:
        raise HostError("nothing to explain", hint="e.g. invoke explain-exit 0x80000022")
    m = re.search(r"suberror[:\s]+(\d+)", s, re.I)
    if m and kind in ("auto", "suberror"):
        e = explain_suberror(int(m.group(1)))
        if re.search(r"emulation failure", s, re.I) and e.code != 1:
            e.details.append("message says 'emulation failure' but suberror is not 1")
        return e
    m = re.search(r"(?:hardware error|entry failure reason|hardware_entry_failure_reason)"
                  r"\s*[:=]?\s*(0x[0-9a-f]+|\d+)", s, re.I)
    if m:
        v = parse_int(m.group(1))
        if kind == "svm" or (kind == "auto" and v > 0xFFFFFFFF):
            return explain_svm(v)
        e = explain_vmx(v)
        e.details.insert(0, "qemu's 'KVM: entry failed, hardware error X' carries "
                            "hardware_entry_failure_reason: the VMX exit reason on Intel")
        return e
    m = re.search(r"unhandled exit\s+(?:0x)?([0-9a-f]+)", s, re.I)
    if m and kind in ("auto", "vmx"):
        e = explain_vmx(int(m.group(1), 16))  # qemu-kvm prints hw.hardware_exit_reason in hex
        e.details.insert(0, "'kvm: unhandled exit N' (qemu-kvm): N is the hardware exit "
                            "reason in hex (KVM_EXIT_UNKNOWN)")
        return e
    for pat, name, meaning, steps in QEMU_MESSAGES:
        if re.search(pat, s, re.I):
            return Explanation("qemu", -1, name, meaning, steps, [f"matched: {pat}"])
    m = re.search(r"KVM_EXIT_[A-Z0-9_]+", s, re.I)
    if m:
        by_name = {v: k for k, v in KVM_EXITS.items()}
        wanted = m.group(0).upper()
        if wanted not in by_name:
            raise HostError(f"unknown KVM exit name {m.group(0)}",
                            hint="known: " + ", ".join(sorted(by_name)[:6]) + ", ... "
                                 "(see <linux/kvm.h>)")
        return explain_kvm_exit(by_name[wanted])
    if re.search(r"emulation failure", s, re.I):
        return explain_suberror(1)
    if re.search(r"[a-z]{3,}", s, re.I) and not re.fullmatch(r"(0x)?[0-9a-f_]+h?", s, re.I):
        raise HostError(f"cannot find an exit reason in {s!r}",
                        hint="give the number, or qemu's line such as 'KVM internal error. "
                             "Suberror: 1' or 'KVM: entry failed, hardware error 0x80000021'")
    v = parse_int(s)
    if kind == "auto" and v > 0xFFFFFFFF:
        return explain_svm(v)  # only SVM codes are 64-bit (VMEXIT_INVALID = -1)
    if kind in ("auto", "vmx"):
        return explain_vmx(v)
    return {"svm": explain_svm, "kvm-exit": explain_kvm_exit,
            "suberror": explain_suberror}[kind](v)
