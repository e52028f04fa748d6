"""The host doctor: every CPU, firmware, module and /dev/kvm check plus the probe guest; a verdict.

Also the host room's entry points for the task layer: ``load_modules`` (kvmlab.host.modules for
this CPU's vendor) and ``explain_exit`` (kvmlab.host.exits). The probe itself lives in
kvmlab.host.probe; its names are re-exported here for callers of ``kvmlab.host.doctor``.

Run ``python3 -m kvmlab.host.doctor --probe`` (or ``--doctor``) to print the probe (the report) as
JSON: the testinfra checks use it on remote hosts, which need only the standard library.
"""
from __future__ import annotations

import argparse
import errno as errno_mod
import grp
import json
import os
import stat
import sys
from dataclasses import asdict, dataclass
from typing import Any

from kvmlab.host import cpu, exits, kvmapi, kvmioctl
from kvmlab.host import modules as kmod
from kvmlab.host.modules import ModulesResult, ModulesUnsupported  # noqa: F401  (re-exported API)
from kvmlab.host.probe import (  # noqa: F401  (re-exported API: callers use kvmlab.host.doctor)
    EMULATED_SHARE,
    VERDICT_API,
    VERDICT_BROKEN,
    VERDICT_FIRMWARE,
    VERDICT_NO_CPU,
    VERDICT_NO_DEV,
    VERDICT_PARAVIRT,
    VERDICT_PERM,
    VERDICT_TIMEOUT,
    VERDICT_USABLE,
    KvmProbe,
    emulated,
    probe_kvm,
    verdict_from_record,
)

# ---------------------------------------------------------------------------------------------
# doctor

STATUSES = ("ok", "warn", "fail", "unknown")
KVM_MAJOR_MINOR = (10, 232)


@dataclass
class Check:
    """One doctor line: status is ok / warn / fail / unknown; needs_root marks an unknown that
    only root could resolve (shown as "unknown (needs root)")."""
    name: str
    status: str
    value: str
    explanation: str
    hint: str = ""
    needs_root: bool = False
    data: dict[str, Any] | None = None

    @property
    def shown_status(self) -> str:
        return "unknown (needs root)" if self.status == "unknown" and self.needs_root \
            else self.status


@dataclass
class DoctorReport:
    checks: list[Check]
    probe: KvmProbe
    uid: int

    @property
    def verdict(self) -> str:
        return self.probe.verdict

    @property
    def usable(self) -> bool:
        return self.probe.usable

    def check(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def facts(self) -> dict[str, Any]:
        """Stable host facts for lock files (no timings, nonces or counters): verdict, usable,
        CPU identity, VMX/SVM, hypervisor, module states, /dev/kvm, KVM API version."""
        def data(name: str) -> dict[str, Any]:
            try:
                return self.check(name).data or {}
            except KeyError:
                return {}
        cpu_d, virt, hv = data("CPU"), data("virtualization extensions"), data("hypervisor")
        mods, dev, api = data("kvm modules"), data("/dev/kvm"), data("KVM API")
        return {
            "verdict": self.verdict, "usable": self.usable,
            "cpu": {k: cpu_d.get(k) for k in ("vendor", "brand", "family", "model", "stepping")},
            "vmx": virt.get("vmx"), "svm": virt.get("svm"),
            "hypervisor": hv.get("vendor") if hv.get("hypervisor") else None,
            "modules_supported": mods.get("supported"),
            "modules": {n: m.get("state") for n, m in (mods.get("modules") or {}).items()},
            "dev_kvm": ({k: dev.get(k) for k in ("major", "minor", "mode", "group")}
                        if dev else None),
            "api_version": api.get("api_version"),
        }

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "usable": self.usable, "uid": self.uid,
                "facts": self.facts(),
                "checks": [{**asdict(c), "shown_status": c.shown_status} for c in self.checks],
                "probe": self.probe.to_dict()}


def _check_cpu(ident: dict[str, Any]) -> Check:
    v = (f"{ident.get('vendor')} {ident.get('brand', '?')} (family {ident.get('family')}, "
         f"model {ident.get('model')}, stepping {ident.get('stepping')})")
    return Check("CPU", "ok", v, f"read with {ident.get('source')}", data=dict(ident))


def _check_virt(ident: dict[str, Any], flags: set[str]) -> Check:
    src = ident.get("source")
    vmx, svm = ident.get("vmx"), ident.get("svm")
    cross = f"/proc/cpuinfo flags: vmx={'vmx' in flags}, svm={'svm' in flags}"
    data = {"vmx": vmx, "svm": svm, "source": src, "cpuinfo_vmx": "vmx" in flags,
            "cpuinfo_svm": "svm" in flags}
    if vmx or svm:
        what = "VMX (Intel VT-x)" if vmx else "SVM (AMD-V)"
        return Check("virtualization extensions", "ok", what,
                     f"CPUID reports {what} (source: {src}); {cross}", data=data)
    hint = ("the outer hypervisor does not expose VMX/SVM: enable nested virtualization there "
            "(kvm_intel/kvm_amd nested=1 and -cpu host), or use TCG"
            if ident.get("hypervisor") else
            "this CPU has no hardware virtualization (or it is hidden): use TCG")
    return Check("virtualization extensions", "fail", "neither VMX nor SVM",
                 f"CPUID.1:ECX[5] (VMX) and CPUID.80000001h:ECX[2] (SVM) are 0 (source: {src}); "
                 f"{cross}", hint, data=data)


def _check_hypervisor(ident: dict[str, Any], flags: set[str]) -> Check:
    if ident.get("hypervisor"):
        vendor = ident.get("hypervisor_vendor") or "unknown (signature not read)"
        sig = ident.get("hypervisor_signature")
        return Check("hypervisor", "warn", f"running under {vendor}",
                     "CPUID.1:ECX[31] (hypervisor) is set" +
                     (f"; CPUID 0x40000000 signature {sig!r}" if sig else "") +
                     f"; /proc/cpuinfo hypervisor flag: {'hypervisor' in flags}",
                     "a KVM inside a VM needs nested virtualization (or is paravirtual) and is "
                     "slower; the probe guest below says whether it works",
                     data={"hypervisor": True, "vendor": vendor, "signature": sig})
    return Check("hypervisor", "ok", "bare metal", "CPUID.1:ECX[31] (hypervisor) is clear",
                 data={"hypervisor": False})


def _check_firmware(ident: dict[str, Any]) -> Check:
    if ident.get("vmx"):
        name, index, decode = "firmware (IA32_FEATURE_CONTROL)", cpu.IA32_FEATURE_CONTROL, \
            cpu.decode_feature_control
    elif ident.get("svm"):
        name, index, decode = "firmware (VM_CR)", cpu.MSR_VM_CR, cpu.decode_vm_cr
    else:
        try:
            msr = f"MSR access: {cpu.ensure_msr_device()} present"
        except cpu.MsrUnavailable as e:
            msr = f"MSR access: {e.reason}"
        return Check("firmware lock", "unknown", "not applicable",
                     "the CPU reports neither VMX nor SVM, so there is no firmware switch to "
                     f"read (IA32_FEATURE_CONTROL 0x3A / VM_CR 0xC0010114); {msr}")
    try:
        d = decode(cpu.read_msr(index))
    except cpu.MsrUnavailable as e:
        return Check(name, "unknown", "not readable", e.reason,
                     "run as root" if e.needs_root else "", needs_root=e.needs_root)
    hint = ("enable Intel VT-x / AMD-V in the firmware setup, then power-cycle"
            if d["status"] == "fail" else "")
    return Check(name, d["status"], f"{d['value']}: {d['state']}",
                 ", ".join(f"{k}={v}" for k, v in d.items()
                           if k not in ("value", "state", "status")), hint, data=d)


def _check_vmx_caps(ident: dict[str, Any]) -> Check:
    if not ident.get("vmx"):
        why = ("AMD CPU: SVM has no VMX capability MSRs" if ident.get("svm")
               else "the CPU reports no VMX")
        return Check("VMX capabilities", "unknown", "not applicable", why)
    try:
        caps = cpu.read_vmx_capabilities()
    except cpu.MsrUnavailable as e:
        return Check("VMX capabilities", "unknown", "not readable", e.reason,
                     "run as root" if e.needs_root else "", needs_root=e.needs_root)
    sec = caps.get("IA32_VMX_PROCBASED_CTLS2", {})
    supported = set(sec.get("supported", []))
    missing = [n for n in ("Enable EPT", "Unrestricted guest", "Enable VPID")
               if n not in supported]
    basic = caps["IA32_VMX_BASIC"]
    v = (f"VMCS revision {basic['vmcs_revision_id']:#x}, {basic['vmcs_size']} bytes, "
         f"true controls {basic['true_controls']}; " +
         ("EPT, unrestricted guest, VPID supported" if not missing
          else "missing: " + ", ".join(missing)))
    return Check("VMX capabilities", "warn" if missing else "ok", v,
                 "IA32_VMX_BASIC 0x480 and control MSRs 0x481-0x484, 0x48B decoded "
                 "(allowed-0 / allowed-1 settings in --json)",
                 "without EPT / unrestricted guest KVM emulates real mode and shadow-pages: "
                 "slow" if missing else "", data=caps)


def _check_modules(ident: dict[str, Any]) -> list[Check]:
    rep = kmod.modules_report()
    mods = rep.modules
    vendor_mod = kmod.VENDOR_MODULE.get(cpu.module_vendor(ident), "")
    summary = ", ".join(f"{n} {m.state}" for n, m in mods.items())
    backends = [n for n in ("kvm_intel", "kvm_amd", "kvm_pvm") if mods[n].present()]
    if not mods["kvm"].present():
        status, hint = "fail", ("invoke load-modules" if rep.supported else
                                "boot a kernel with CONFIG_KVM (this one has no module support)")
    elif vendor_mod and mods[vendor_mod].present():
        status, hint = "ok", ""
    elif backends:
        status, hint = "warn", (f"{vendor_mod or 'the hardware module'} is not available; the "
                                f"KVM backend here is {', '.join(backends)}")
    else:
        status, hint = "fail", f"load {vendor_mod or 'kvm_intel/kvm_amd'}: invoke load-modules"
    out = [Check("kvm modules", status, summary,
                 rep.detail + "; " + "; ".join(f"{n}: {m.detail}" for n, m in mods.items()),
                 hint, data=rep.to_dict())]
    params: dict[str, str] = {}
    for n, m in mods.items():
        for k, val in m.params.items():
            if k in kmod.INTERESTING_PARAMS:
                params[f"{n}.{k}"] = val
    nested = {k: v for k, v in params.items() if k.endswith(".nested")}
    out.append(Check("module parameters", "ok" if params else "unknown",
                     ", ".join(f"{k}={v}" for k, v in params.items()) or "none readable",
                     "from /sys/module/<module>/parameters" +
                     ("; nested=" + ",".join(f"{k}={v}" for k, v in nested.items())
                      if nested else ""),
                     data={n: m.params for n, m in mods.items() if m.params}))
    return out


def check_backend(ident: dict[str, Any], states: dict[str, str]) -> Check:
    """Which vendor module fits this CPU, from CPUID (kvmlab.host.cpu.kvm_backends), and why
    the other one is refused: e.g. under qemu TCG ``-cpu max`` (SVM, no VMX) kvm_intel cannot
    load whatever the vendor string says. ``states``: module -> loaded/built-in/available/absent."""
    b = cpu.kvm_backends(str(ident.get("vendor", "")), int(ident.get("leaf1_ecx") or
                                                           (0x20 if ident.get("vmx") else 0)),
                         int(ident.get("ext1_ecx") or (0x4 if ident.get("svm") else 0)))
    mod = b["module"]
    why = "; ".join(f"{m}: {text}" for m, text in b["refused"].items())
    ext = " and ".join(n for n, on in (("VMX", b["vmx"]), ("SVM", b["svm"])) if on) or "neither"
    data = {**b, "states": dict(states)}
    if mod is None:
        return Check("KVM backend", "fail", "none: neither VMX nor SVM in CPUID", why,
                     "enable nested virtualization on the outer host, or use TCG", data=data)
    value = f"{mod} (CPUID offers {ext}; vendor {b['vendor']})"
    present = states.get(mod) in ("loaded", "built-in")
    return Check("KVM backend", "ok" if present else "warn", value,
                 f"{mod} is {states.get(mod, 'absent')}" + (f"; {why}" if why else ""),
                 "" if present else f"load {mod}: invoke load-modules", data=data)


def _check_dev(dev: str) -> Check:
    try:
        st = os.stat(dev)
    except FileNotFoundError:
        return Check("/dev/kvm", "fail", "missing", f"{dev} does not exist",
                     "load kvm + kvm_intel/kvm_amd (invoke load-modules)")
    except OSError as e:
        return Check("/dev/kvm", "fail", "not accessible", f"stat {dev}: {e.strerror}")
    if not stat.S_ISCHR(st.st_mode):
        return Check("/dev/kvm", "fail", "not a character device", stat.filemode(st.st_mode))
    mm = (os.major(st.st_rdev), os.minor(st.st_rdev))
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    access = os.access(dev, os.R_OK | os.W_OK)
    v = (f"char {mm[0]}:{mm[1]} {stat.filemode(st.st_mode)} uid {st.st_uid} group {group}; "
         f"{'read/write' if access else 'no access'} for uid {os.getuid()}")
    data = {"major": mm[0], "minor": mm[1], "mode": oct(st.st_mode & 0o7777), "uid": st.st_uid,
            "gid": st.st_gid, "group": group, "access": access}
    if mm != KVM_MAJOR_MINOR:
        return Check("/dev/kvm", "fail", v, f"expected device 10:232, found {mm[0]}:{mm[1]}",
                     "recreate it: mknod /dev/kvm c 10 232", data=data)
    if not access:
        return Check("/dev/kvm", "fail" if os.geteuid() == 0 else "unknown", v,
                     "this user cannot open /dev/kvm",
                     f"add the user to group {group} (usermod -aG {group} USER) or run as root",
                     needs_root=os.geteuid() != 0, data=data)
    return Check("/dev/kvm", "ok", v, "present, the KVM misc device, accessible", data=data)


def _check_api(dev: str) -> Check:
    try:
        facts = kvmapi.api_facts(dev)
    except PermissionError as e:
        return Check("KVM API", "unknown", "not readable", f"open {dev}: {e.strerror}",
                     "run as root or as a member of the kvm group", needs_root=True)
    except OSError as e:
        return Check("KVM API", "fail" if os.path.exists(dev) else "unknown", "not readable",
                     f"{dev}: {errno_mod.errorcode.get(e.errno or 0, e.errno)} ({e.strerror})")
    caps = facts["caps"]
    v = f"KVM_GET_API_VERSION {facts['api_version']}; " + ", ".join(
        f"{k[len('KVM_CAP_'):]}={val}" for k, val in caps.items())
    ok = facts["api_version"] == kvmapi.KVM_API_VERSION and caps.get("KVM_CAP_USER_MEMORY") == 1
    return Check("KVM API", "ok" if ok else "fail", v,
                 "KVM_GET_API_VERSION and KVM_CHECK_EXTENSION on /dev/kvm",
                 "" if ok else "this KVM is too old or broken", data=facts)


def _check_probe(p: KvmProbe) -> Check:
    if p.usable:
        return Check("probe guest", "ok", p.verdict, p.detail, data=p.to_dict())
    if p.verdict == VERDICT_PERM:
        return Check("probe guest", "unknown" if os.geteuid() != 0 else "fail", p.verdict,
                     p.detail, "run as root or as a member of the kvm group",
                     needs_root=os.geteuid() != 0, data=p.to_dict())
    hint = {VERDICT_PARAVIRT: "run guests under TCG (qemu -accel tcg; qemu-kvm 0.12: -no-kvm); "
                              "KVM here accepts only paravirtual guests",
            VERDICT_FIRMWARE: "enable VT-x/AMD-V in the firmware setup",
            VERDICT_TIMEOUT: "run guests under TCG"}.get(p.verdict, "")
    return Check("probe guest", "fail", p.verdict, p.detail, hint, data=p.to_dict())


def _check_qemu012(dev: str, api: Check) -> Check | None:
    """Where the probe and qemu-kvm 0.12 disagree: the KVM API answers, but 0.12's first VM
    call (KVM_CREATE_PIT before the irqchip) fails, so 0.12 falls back to TCG."""
    if api.status != "ok":
        return None
    try:
        err = kvmioctl.pit_before_irqchip(dev)
    except OSError as e:
        return Check("qemu-kvm 0.12 start", "unknown", "not tried", f"{dev}: {e.strerror}")
    if err == 0:
        return Check("qemu-kvm 0.12 start", "ok", "KVM_CREATE_PIT = 0",
                     "KVM_CREATE_PIT before KVM_CREATE_IRQCHIP succeeds (0.12's order)")
    name = errno_mod.errorcode.get(err, str(err))
    return Check("qemu-kvm 0.12 start", "warn", f"KVM_CREATE_PIT = -1 {name}",
                 "the KVM API answers, but qemu-kvm 0.12 would fall back to TCG: its "
                 "kvm_arch_create asks for the PIT before the in-kernel irqchip",
                 "see it call by call: invoke trace-kvm --qemu <a qemu-kvm 0.12 build>")


def doctor(*, timeout: float = 10, dev: str = kvmapi.DEV_KVM) -> DoctorReport:
    """Run every host check and the probe guest; never raises for a failing check."""
    ident = cpu.cpu_identity()
    try:
        _kv, flags = cpu.cpuinfo_flags()
    except OSError:
        flags = set()
    checks = [_check_cpu(ident), _check_virt(ident, flags), _check_hypervisor(ident, flags),
              _check_firmware(ident), _check_vmx_caps(ident), *_check_modules(ident)]
    states = (checks[-2].data or {}).get("modules") or {}
    checks += [check_backend(ident, {n: m.get("state", "absent") for n, m in states.items()}),
               _check_dev(dev), _check_api(dev)]
    q012 = _check_qemu012(dev, checks[-1])
    checks += [q012] if q012 else []
    probe = probe_kvm(timeout, dev)
    checks.append(_check_probe(probe))
    return DoctorReport(checks, probe, os.getuid())


def load_modules(ko: list[str] | None = None, *, unload: bool = False) -> ModulesResult:
    """Load (or with unload=True, rmmod) kvm + the module for this CPU's vendor.

    Raises ModulesUnsupported (a HostError) on a kernel without loadable-module support, other
    HostErrors with the kernel log's reason; see kvmlab.host.modules for the details."""
    # the module follows the extension CPUID offers (SVM only -> kvm_amd), not the vendor string
    vendor = cpu.module_vendor(cpu.cpu_identity())
    if unload:
        return kmod.unload_modules(vendor)
    return kmod.load_modules(vendor, ko)


def explain_exit(text: str, kind: str = "auto") -> Any:
    """Decode a VM-exit reason, KVM_EXIT_* code, suberror or qemu message (kvmlab.host.exits)."""
    return exits.explain(text, kind)


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m kvmlab.host.doctor")
    ap.add_argument("--probe", action="store_true", help="print probe_kvm() as JSON")
    ap.add_argument("--doctor", action="store_true", help="print doctor() as JSON")
    ap.add_argument("--timeout", type=float, default=10)
    ap.add_argument("--dev", default=kvmapi.DEV_KVM)
    args = ap.parse_args(argv)
    if args.probe:
        print(json.dumps(probe_kvm(args.timeout, args.dev).to_dict()))
        return 0
    if args.doctor:
        print(json.dumps(doctor(timeout=args.timeout, dev=args.dev).to_dict()))
        return 0
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
