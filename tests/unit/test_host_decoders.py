"""Decoders for CPUID, MSRs, VM-exit reasons and the probe verdict, with values from real CPUs.

Provenance of the values (all printed by real processors, copied from public logs):
- VBOX_SKYLAKE: VirtualBox VBox.log "HM:" lines in github.com/myspaghetti/macos-virtualbox
  issue #357 (a 6th-gen+ Intel host): MSR_IA32_FEATURE_CONTROL = 0x5,
  MSR_IA32_VMX_BASIC = 0xda040000000004, MSR_IA32_VMX_PINBASED_CTLS = 0x7f00000016
  ("POSTED_INT (must be cleared)"), MSR_IA32_VMX_PROCBASED_CTLS = 0xfff9fffe0401e172
  ("CR3_LOAD_EXIT (must be set)").
- VBOX_ENTRY_EXIT: same kind of log in macos-virtualbox issue #224: MSR_IA32_VMX_ENTRY_CTLS =
  0x3ffff000011ff ("LOAD_DEBUG (must be set)", "LOAD_RTIT_CTL_MSR (must be cleared)"),
  MSR_IA32_VMX_EXIT_CTLS = 0x1ffffff00036dff ("CLEAR_RTIT_CTL_MSR (must be cleared)").
- VBOX_OLD: VirtualBox log in github.com/docker/machine issue #1678 (an older Intel host,
  "VT-x implementation 2.0"): MSR_IA32_FEATURE_CONTROL = 0x7, MSR_IA32_VMX_BASIC_INFO =
  0x5a08000000000d ("VMCS size = 2048 bytes", no true-capability MSRs).
- Locked-disabled IA32_FEATURE_CONTROL = 0x1: the value firmware leaves when VT-x is switched off
  (lock bit set, both VMXON bits clear; SDM Vol. 3C 24.7); the kernel's check (msr & 5) == 1 is
  what prints "kvm: disabled by bios" (as in github.com/platform9/express issue #206).
- THIS_MACHINE: CPUID of the CI machine (AMD EPYC, family 25 model 17, under KVM), read with
  /dev/cpu/0/cpuid on 2026-11-26: leaf 1 = eax 0xa10f11 ecx 0xfffa3203; leaf 0x80000001 ecx
  0x4003f3 - a CPU that offers neither VMX nor SVM.
"""
from __future__ import annotations

import pytest

from kvmlab.core.errors import HostError
from kvmlab.host import cpu, exits
from kvmlab.host import doctor as host
from kvmlab.host import modules as kmod


# --- CPUID -----------------------------------------------------------------------------------
def test_cpu_without_vmx_or_svm_this_machine():
    assert cpu.decode_leaf1(0xFFFA3203) == {"vmx": False, "smx": False, "hypervisor": True}
    assert cpu.decode_ext1(0x4003F3) == {"svm": False}
    assert cpu.family_model(0xA10F11) == (25, 17, 1)


def test_family_model_intel():
    # Intel Core i5-6500 (Skylake): "family: 0x6, model: 0x5e, stepping: 0x3" in the kernel log of
    # github.com/seL4/camkes-vm-examples issue #95; CPUID.1:EAX is 0x506e3 for it.
    assert cpu.family_model(0x506E3) == (6, 0x5E, 3)


def test_vendor_and_hypervisor_signature():
    r = cpu.Cpuid(0xD, 0x68747541, 0x444D4163, 0x69746E65)  # "AuthenticAMD"
    assert cpu.vendor_from_cpuid0(r) == "AuthenticAMD"
    kvm = cpu.Cpuid(0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D)  # KVM's leaf 0x40000000
    assert cpu.signature(kvm) == "KVMKVMKVM"
    assert cpu.HYPERVISORS[cpu.signature(kvm)] == "KVM"


def test_native_cpuid_matches_proc_cpuinfo():
    """The CPUID instruction run from Python agrees with the kernel's view of the CPU."""
    ident = cpu.cpu_identity()
    kv, flags = cpu.cpuinfo_flags()
    assert ident["vendor"] == kv["vendor_id"]
    assert ident["family"] == int(kv["cpu family"]) and ident["model"] == int(kv["model"])
    assert ident["hypervisor"] == ("hypervisor" in flags)
    # the kernel may hide vmx/svm from cpuinfo but never shows a flag the CPU lacks
    assert ("vmx" in flags) <= bool(ident["vmx"]) and ("svm" in flags) <= bool(ident["svm"])


# --- IA32_FEATURE_CONTROL / VM_CR ------------------------------------------------------------
def test_feature_control_locked_enabled():
    d = cpu.decode_feature_control(0x5)   # VBOX_SKYLAKE
    assert d["lock"] and d["vmxon_outside_smx"] and not d["vmxon_inside_smx"]
    assert d["status"] == "ok" and "enabled" in d["state"]


def test_feature_control_locked_enabled_inside_and_outside_smx():
    d = cpu.decode_feature_control(0x7)   # VBOX_OLD
    assert d["lock"] and d["vmxon_inside_smx"] and d["vmxon_outside_smx"]
    assert d["status"] == "ok"


def test_feature_control_locked_disabled():
    d = cpu.decode_feature_control(0x1)
    assert d["lock"] and not d["vmxon_outside_smx"]
    assert d["status"] == "fail" and "disabled in firmware" in d["state"]


def test_feature_control_unlocked():
    d = cpu.decode_feature_control(0x0)
    assert not d["lock"] and d["status"] == "ok" and "unlocked" in d["state"]


def test_vm_cr_svmdis():
    # "kvm_amd: SVM disabled (by BIOS) in MSR_VM_CR" (github.com/HoShiMin/Kernel-Bridge #50):
    # VM_CR bit 4 SVMDIS, bit 3 LOCK.
    assert cpu.decode_vm_cr(0x18)["status"] == "fail"
    assert cpu.decode_vm_cr(0x0)["status"] == "ok"


# --- VMX capability MSRs ---------------------------------------------------------------------
def test_vmx_basic_skylake():
    d = cpu.decode_vmx_basic(0xDA040000000004)
    assert d["vmcs_revision_id"] == 4 and d["vmcs_size"] == 1024
    assert d["vmcs_memory_type"].startswith("WB")
    assert d["dual_monitor_smm"] and d["ins_outs_exit_info"] and d["true_controls"]
    assert not d["phys_addr_32bit_only"]


def test_vmx_basic_old_cpu():
    d = cpu.decode_vmx_basic(0x5A08000000000D)
    assert d["vmcs_revision_id"] == 0xD and d["vmcs_size"] == 2048
    assert d["vmcs_memory_type"].startswith("WB") and not d["true_controls"]


def _setting(d, name):
    return next(c["setting"] for c in d["controls"] if c["name"] == name)


def test_pinbased_skylake():
    d = cpu.decode_controls(0x7F00000016, cpu.PIN_BASED)
    assert _setting(d, "Process posted interrupts") == "must be 0"   # "(must be cleared)"
    for n in ("External-interrupt exiting", "NMI exiting", "Virtual NMIs",
              "Activate VMX-preemption timer"):
        assert _setting(d, n) == "0 or 1"
    assert d["reserved_must_be_1"] == [1, 2, 4]   # the default1 class bits 1, 2, 4


def test_procbased_skylake():
    d = cpu.decode_controls(0xFFF9FFFE0401E172, cpu.PROC_BASED)
    assert _setting(d, "CR3-load exiting") == "must be 1"    # "(must be set)"
    assert _setting(d, "CR3-store exiting") == "must be 1"
    assert _setting(d, "HLT exiting") == "0 or 1"
    assert _setting(d, "Activate secondary controls") == "0 or 1"
    assert _setting(d, "Activate tertiary controls") == "must be 0"


def test_entry_exit_controls():
    e = cpu.decode_controls(0x3FFFF000011FF, cpu.ENTRY_CTLS)
    assert _setting(e, "Load debug controls") == "must be 1"
    assert _setting(e, "IA-32e mode guest") == "0 or 1"
    assert _setting(e, "Load IA32_EFER") == "0 or 1"
    assert _setting(e, "Load IA32_RTIT_CTL") == "must be 0"
    x = cpu.decode_controls(0x1FFFFFF00036DFF, cpu.EXIT_CTLS)
    assert _setting(x, "Save debug controls") == "must be 1"
    assert _setting(x, "Host address-space size") == "0 or 1"
    assert _setting(x, "Clear IA32_RTIT_CTL") == "must be 0"


def test_secondary_controls_allowed0_always_zero():
    # SDM A.3.3: bits 31:0 of IA32_VMX_PROCBASED_CTLS2 are always 0. High word 0x000000a2:
    # EPT (1), VPID (5), unrestricted guest (7) may be 1, nothing else.
    d = cpu.decode_controls(0xA2 << 32, cpu.PROC_BASED2)
    assert set(d["supported"]) == {"Enable EPT", "Enable VPID", "Unrestricted guest"}
    assert all(c["setting"] != "must be 1" for c in d["controls"])


# --- exit reasons ----------------------------------------------------------------------------
def test_vmx_exit_table_is_complete():
    assert len(exits.VMX_EXIT_REASONS) >= 70
    assert exits.VMX_EXIT_REASONS[48] == "EPT violation"
    assert 35 not in exits.VMX_EXIT_REASONS and 38 not in exits.VMX_EXIT_REASONS


def test_entry_failure_msr_loading():
    e = exits.explain("0x80000022")
    assert e.kind == "vmx" and "MSR loading" in e.name
    assert "0x484" in e.next_steps and "MSR-load area" in e.next_steps
    assert any("bit 31" in d for d in e.details)


def test_entry_failure_invalid_guest_state_from_qemu_text():
    e = exits.explain("KVM: entry failed, hardware error 0x80000021")
    assert "invalid guest state" in e.name and "Unrestricted guest" in e.next_steps


def test_decimal_and_plain_exit():
    assert "HLT" in exits.explain("12").name
    assert exits.explain("30").name.endswith("I/O instruction")


def test_qemu_internal_error_text():
    e = exits.explain("KVM internal error. Suberror: 1 emulation failure")
    assert e.kind == "suberror" and e.code == 1 and "emulat" in e.meaning


def test_kvm_exit_numbers_and_names():
    assert exits.explain("17", "kvm-exit").name == "KVM_EXIT_INTERNAL_ERROR"
    assert exits.explain("KVM_EXIT_SHUTDOWN").code == 8


def test_svm_invalid():
    assert "VMEXIT_INVALID" in exits.explain("0xffffffffffffffff").name


@pytest.mark.parametrize("bad", ["", "foo", "0x1ffffffff --kind vmx"])
def test_explain_rejects_garbage(bad):
    with pytest.raises(HostError):
        exits.explain(bad)


# --- module failures from kernel logs --------------------------------------------------------
@pytest.mark.parametrize("log,expect", [
    ("[   38.526047] kvm: disabled by bios", "firmware"),                 # platform9/express#206
    ("[852791.201874] kvm: no hardware support", "does not offer"),        # platform9/express#206
    ("kvm_amd: SVM disabled (by BIOS) in MSR_VM_CR", "firmware"),           # Kernel-Bridge#50
    ("modprobe: FATAL: Module kvm_intel not found in directory /lib/modules/6.1.0-9-amd64",
     "module directory"),
    ("rmmod: ERROR: Module kvm_intel is in use", "in use"),
])
def test_explain_module_failure(log, expect):
    reason, hint = kmod.explain_module_failure(log)
    assert expect in reason and hint


# --- probe verdict from a record -------------------------------------------------------------
def _guest(name, runs, insn_emul, n, ok):
    return {"guest": name, "ok": ok, "stage": "done", "runs": runs, "error": None, "nonce": 1,
            "instructions": n, "expected": {"port": 0xE9, "size": 2, "value": 0x1235},
            "stats": {"exits": len(runs), "insn_emulation": insn_emul}}


OUT = {"exit_reason": 2, "exit_name": "KVM_EXIT_IO", "direction": "out", "size": 2,
       "port": 0xE9, "count": 1, "value": 0x1235}
HLT = {"exit_reason": 5, "exit_name": "KVM_EXIT_HLT"}
EMUL_FAIL = {"exit_reason": 17, "exit_name": "KVM_EXIT_INTERNAL_ERROR", "suberror": 1,
             "suberror_name": "KVM_INTERNAL_ERROR_EMULATION", "insn_bytes": "d9 e8"}


def test_verdict_hardware_kvm():
    rec = {"api_version": 12, "error": None,
           "guests": [_guest("basic", [OUT, HLT], 0, 5, True),
                      _guest("workload", [OUT, HLT], 0, 3011, True)]}
    assert host.verdict_from_record(rec)[:2] == (True, host.VERDICT_USABLE)


def test_verdict_emulation_failure():
    rec = {"api_version": 12, "error": None,
           "guests": [_guest("basic", [OUT, HLT], 5, 5, True),
                      _guest("workload", [EMUL_FAIL], 3004, 3011, False)]}
    usable, verdict, detail = host.verdict_from_record(rec)
    assert not usable and verdict == host.VERDICT_PARAVIRT
    assert "suberror 1" in detail and "d9 e8" in detail and "3004 of 3011" in detail


def test_verdict_all_emulated_but_correct():
    rec = {"api_version": 12, "error": None,
           "guests": [_guest("basic", [OUT, HLT], 5, 5, True),
                      _guest("workload", [OUT, HLT], 3011, 3011, True)]}
    usable, verdict, detail = host.verdict_from_record(rec)
    assert not usable and verdict == host.VERDICT_PARAVIRT and "emulator" in detail


@pytest.mark.parametrize("err,verdict", [
    ({"stage": "open", "errno": "EACCES", "strerror": "Permission denied"}, host.VERDICT_PERM),
    ({"stage": "open", "errno": "ENOENT", "strerror": "No such file"}, host.VERDICT_NO_DEV),
    ({"stage": "KVM_CREATE_VM", "errno": "EBUSY", "strerror": "busy"}, host.VERDICT_BROKEN),
])
def test_verdict_errors(err, verdict):
    assert host.verdict_from_record({"error": err, "guests": []})[1] == verdict


def test_qemu_kvm_messages():
    # the two lines qemu-kvm 0.12 prints on the CI machines (FACTS.md), and qemu-kvm's
    # "kvm: unhandled exit %llx" for KVM_EXIT_UNKNOWN (hex without 0x)
    e = exits.explain("Create kernel PIC irqchip failed")
    assert e.kind == "qemu" and "TCG" in e.meaning and "-no-kvm" in e.next_steps
    assert exits.explain("Could not initialize KVM, will disable KVM support").kind == "qemu"
    e = exits.explain("kvm: unhandled exit 80000021")
    assert e.kind == "vmx" and e.code == 0x80000021 and "invalid guest state" in e.name
    e = exits.explain("Could not access KVM kernel module: Permission denied")
    assert "kvm group" in e.next_steps


def test_cpuid_sources_agree():
    """The CPUID instruction run from Python and the kernel's /dev/cpu/0/cpuid give the same
    registers (EBX of leaf 1 holds the APIC id of whichever CPU ran it, so it is masked)."""
    import os
    if not os.access("/dev/cpu/0/cpuid", os.R_OK):
        pytest.skip("/dev/cpu/0/cpuid not readable (needs root and CONFIG_X86_CPUID)")
    if cpu._native_cpuid() is None:
        pytest.skip("cannot execute CPUID from Python here")
    import struct
    fd = os.open("/dev/cpu/0/cpuid", os.O_RDONLY)
    try:
        for leaf in (0, 1, 0x80000001, 0x40000000):
            dev = struct.unpack("<4I", os.pread(fd, 16, leaf))
            nat, src = cpu.cpuid(leaf)
            assert src == "cpuid instruction"
            if leaf == 1:
                assert (nat.eax, nat.ecx & ~(1 << 27), nat.edx) == \
                    (dev[0], dev[2] & ~(1 << 27), dev[3])   # OSXSAVE may differ per context
            else:
                assert (nat.eax, nat.ebx, nat.ecx, nat.edx) == dev
    finally:
        os.close(fd)


def test_cpuinfo_fallback_parses_flags():
    # first block of /proc/cpuinfo on the CI machine (AMD EPYC under KVM), trimmed
    text = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
            "model name\t: AMD EPYC\nstepping\t: 1\nflags\t\t: fpu vme de pse tsc msr pae "
            "hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a\n\nprocessor\t: 1\n")
    kv, flags = cpu.cpuinfo_flags(text)
    assert kv["vendor_id"] == "AuthenticAMD" and kv["cpu family"] == "25"
    assert "hypervisor" in flags and "vmx" not in flags and "svm" not in flags


# CPUID read by the doctor inside the nested lab VM (Debian's qemu 7.2, TCG, -cpu max:
# "AuthenticAMD", "QEMU TCG CPU version 2.5+", family 15 model 107): SVM, no VMX
TCG_MAX_LEAF1_ECX = 0xFED8320B      # hypervisor (bit 31) set; bit 5 (VMX) clear
TCG_MAX_EXT1_ECX = 0x00000075       # LAHF, SVM (bit 2), ABM, SSE4A, ...
INTEL_HOST_LEAF1_ECX = 0x7FFAFBFF   # a Skylake host: VMX (bit 5) set
INTEL_HOST_EXT1_ECX = 0x00000121    # LAHF, LZCNT, PREFETCHW: no SVM


def test_backend_from_cpuid_tcg_max_explains_kvm_intel_refusal():
    for vendor in ("AuthenticAMD", "GenuineIntel"):   # TCG may show either vendor string
        b = cpu.kvm_backends(vendor, TCG_MAX_LEAF1_ECX, TCG_MAX_EXT1_ECX)
        assert (b["vmx"], b["svm"], b["module"]) == (False, True, "kvm_amd")
        assert set(b["refused"]) == {"kvm_intel"}
        assert "VMX absent" in b["refused"]["kvm_intel"] and "0xfed8320b" in b["refused"]["kvm_intel"]
        ident = {"vendor": vendor, "vmx": False, "svm": True,
                 "leaf1_ecx": TCG_MAX_LEAF1_ECX, "ext1_ecx": TCG_MAX_EXT1_ECX}
        assert cpu.module_vendor(ident) == "AuthenticAMD"
        c = host.check_backend(ident, {"kvm": "loaded", "kvm_amd": "loaded",
                                       "kvm_intel": "available"})
        assert c.status == "ok" and c.value.startswith("kvm_amd")
        assert "kvm_intel: VMX absent" in c.explanation and "SVM" in c.value


def test_backend_from_cpuid_intel_host_and_none():
    b = cpu.kvm_backends("GenuineIntel", INTEL_HOST_LEAF1_ECX, INTEL_HOST_EXT1_ECX)
    assert b["module"] == "kvm_intel" and set(b["refused"]) == {"kvm_amd"}
    ident = {"vendor": "GenuineIntel", "vmx": False, "svm": False, "leaf1_ecx": 0xFFFA3203,
             "ext1_ecx": 0x121}
    c = host.check_backend(ident, {})
    assert c.status == "fail" and set(c.data["refused"]) == {"kvm_intel", "kvm_amd"}
    c = host.check_backend({**ident, "vmx": True, "leaf1_ecx": INTEL_HOST_LEAF1_ECX},
                           {"kvm_intel": "available"})
    assert c.status == "warn" and "invoke load-modules" in c.hint
