"""Host facts for KVM: does /dev/kvm really run an unmodified guest? (doctor, modules, exits).

``probe_kvm`` is the contract other steps use (the vm step picks KVM or TCG from it). It runs the
probe guests of kvmlab.host.kvmapi in a child process (killed after ``timeout``) and derives a verdict
from what the vCPU really did.

Run ``python3 -m kvmlab.host.doctor --probe`` to print the probe as JSON (used by the testinfra checks on
remote hosts).
"""
from __future__ import annotations

import errno as errno_mod
import json
import os
import stat
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvmlab.host import kvmapi
from kvmlab.host.modules import ModulesResult, ModulesUnsupported  # noqa: F401  (re-exported API)

VERDICT_USABLE = "KVM usable"
VERDICT_PARAVIRT = ("KVM present but cannot run unmodified guests (paravirtual / restricted): "
                    "use TCG")
VERDICT_NO_DEV = "no /dev/kvm"
VERDICT_PERM = "permission denied on /dev/kvm"
VERDICT_FIRMWARE = "disabled in firmware"
VERDICT_NO_CPU = "no /dev/kvm: CPU has no VMX/SVM"
VERDICT_API = "unsupported KVM API version"
VERDICT_BROKEN = "KVM present but cannot create or run a VM"
VERDICT_TIMEOUT = "KVM probe timed out (KVM_RUN did not return): use TCG"

# The workload guest counts as emulated when the kernel's instruction emulator decoded at least
# this share of the instructions a correct run executes (hardware virtualization: ~0).
EMULATED_SHARE = 0.5


@dataclass
class KvmProbe:
    """Whether /dev/kvm really executes an unmodified guest.

    usable:  True only when a real-mode guest ran on the vCPU natively and produced the expected
             results (OUT value computed from a random nonce, then HLT).
    verdict: one short sentence from the VERDICT_* constants ("KVM usable", "KVM present but
             cannot run unmodified guests (paravirtual / restricted): use TCG", "no /dev/kvm",
             "permission denied on /dev/kvm", "disabled in firmware", ...).
    detail:  what exactly happened: the ioctl that failed with its errno, or each guest's
             KVM_RUN exits (exit reason, internal-error suberror, instruction bytes) and the
             vCPU's emulation counters.
    record:  the raw probe record (JSON-able) the verdict was derived from; seconds: wall time.
    """
    usable: bool
    verdict: str
    detail: str
    record: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    seconds: float = field(default=0.0, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _src_root() -> str:
    return str(Path(__file__).resolve().parents[2])  # the directory holding kvmlab/


def _run_child(dev: str, timeout: float) -> tuple[dict[str, Any] | None, str]:
    """Run kvmapi's probe in a child python; returns (record, problem)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = _src_root() + (os.pathsep + env["PYTHONPATH"]
                                       if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "kvmlab.host.kvmapi", "--probe-child", dev]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            return None, (f"timeout: the probe process {proc.pid} did not return from the kernel "
                          f"within {timeout:g}s and could not be killed (stuck in KVM_RUN)")
        return None, f"timeout: the probe did not finish within {timeout:g}s (killed)"
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        tail = (err or "").strip().splitlines()[-1:] or [""]
        sig = f"signal {-proc.returncode}" if proc.returncode < 0 else f"status {proc.returncode}"
        return None, f"probe process died ({sig}): {tail[0][:300]}"
    try:
        return json.loads(out), ""
    except ValueError:
        return None, f"probe printed no JSON: {out[:200]!r}"


def _fmt_exit(ex: dict[str, Any]) -> str:
    name = ex.get("exit_name", "?")
    if name == "KVM_EXIT_IO":
        return (f"{name} {ex.get('direction')} port {ex.get('port', 0):#x} size {ex.get('size')} "
                f"value {ex.get('value', 0):#x}")
    if name == "KVM_EXIT_INTERNAL_ERROR":
        s = f"{name} suberror {ex.get('suberror')} ({ex.get('suberror_name')})"
        if ex.get("insn_bytes"):
            s += f", instruction bytes {ex['insn_bytes']}"
        return s
    if name == "KVM_EXIT_FAIL_ENTRY":
        return f"{name} hardware_entry_failure_reason {ex.get('hardware_entry_failure_reason')}"
    if name == "KVM_EXIT_UNKNOWN":
        return f"{name} hardware_exit_reason {ex.get('hardware_exit_reason')}"
    return str(name)


def _fmt_guest(g: dict[str, Any]) -> str:
    what = {"basic": "basic guest (mov/add/out/hlt)",
            "workload": f"workload guest (loop x{kvmapi.LOOP_COUNT} + x87)"}.get(g["guest"],
                                                                              g["guest"])
    exp = g["expected"]
    parts = [f"{what}: expected OUT {exp['value']:#x} on port {exp['port']:#x} then HLT"]
    if g.get("error"):
        e = g["error"]
        parts.append(f"{e['stage']} failed: {e['errno']} ({e['strerror']})")
    else:
        parts.append("exits: " + "; ".join(_fmt_exit(x) for x in g["runs"]) +
                     (f" at rip {g['final_rip']}" if g.get("final_rip") else ""))
    st = g.get("stats")
    if st and "insn_emulation" in st:
        parts.append(f"instruction emulator decoded {st['insn_emulation']} of "
                     f"{g['instructions']} instructions (vCPU exits {st.get('exits', '?')})")
    return ", ".join(parts)


def emulated(g: dict[str, Any]) -> bool | None:
    """True when the kernel's instruction emulator, not the CPU, ran the guest (None: unknown)."""
    st = g.get("stats")
    if not st or "insn_emulation" not in st:
        return None
    return st["insn_emulation"] >= EMULATED_SHARE * g["instructions"]


def verdict_from_record(rec: dict[str, Any]) -> tuple[bool, str, str]:
    """Derive (usable, verdict, detail) from a kvmapi.run_probe record (pure: unit-testable)."""
    err = rec.get("error")
    if err:
        stage, en = err.get("stage"), err.get("errno")
        what = f"{stage}: {en} ({err.get('strerror')})"
        if stage == "open" and en in ("EACCES", "EPERM"):
            return False, VERDICT_PERM, (what + "; add the user to the group owning /dev/kvm "
                                         "(usually kvm) or run as root")
        if stage == "open" and en == "ENOENT":
            return False, VERDICT_NO_DEV, what
        if stage == "KVM_GET_API_VERSION" and en is None:
            return False, VERDICT_API, what
        hint = ""
        if stage == "KVM_CREATE_VM" and en == "EBUSY":
            hint = "; another hypervisor (VirtualBox, VMware) may own VMX/SVM"
        return False, VERDICT_BROKEN, what + hint
    guests = rec.get("guests") or []
    details = [_fmt_guest(g) for g in guests]
    detail = f"API version {rec.get('api_version')}; " + " | ".join(details)
    for g in guests:
        if g.get("error"):
            return False, VERDICT_BROKEN, detail
    if len(guests) < 2:
        return False, VERDICT_BROKEN, detail + " | probe incomplete"
    if not all(g["ok"] for g in guests):
        return False, VERDICT_PARAVIRT, detail
    if any(emulated(g) for g in guests if g["guest"] == "workload"):
        return False, VERDICT_PARAVIRT, (detail + " | the guest ran only through the kernel's "
                                         "instruction emulator, not on the CPU")
    return True, VERDICT_USABLE, detail


def _no_dev_verdict(dev: str) -> tuple[str, str]:
    """Why there is no /dev/kvm: firmware lock, CPU without VMX/SVM, or modules not loaded."""
    try:
        from kvmlab.host import cpu
        facts = cpu.virt_support()
    except Exception as e:  # the decoders must never break the probe
        return VERDICT_NO_DEV, f"{dev} does not exist (CPU facts unavailable: {e})"
    if facts.get("firmware_disabled"):
        return VERDICT_FIRMWARE, (f"{dev} does not exist and IA32_FEATURE_CONTROL is locked with "
                                  "VMX off: enable Intel VT-x in the firmware setup")
    if facts.get("vmx") is False and facts.get("svm") is False:
        src = facts.get("source", "?")
        return VERDICT_NO_CPU, (f"{dev} does not exist and the CPU reports neither VMX nor SVM "
                                f"(source: {src}); nested virtualization is off or unsupported")
    return VERDICT_NO_DEV, (f"{dev} does not exist: load kvm and kvm_intel/kvm_amd "
                            "(invoke load-modules)")


def probe_kvm(timeout: float = 10, dev: str = kvmapi.DEV_KVM) -> KvmProbe:
    """Find out whether ``dev`` really executes an unmodified guest (see KvmProbe)."""
    t0 = time.monotonic()
    if not os.path.exists(dev):
        verdict, detail = _no_dev_verdict(dev)
        return KvmProbe(False, verdict, detail, {"error": {"stage": "stat", "errno": "ENOENT"}},
                        time.monotonic() - t0)
    try:
        st = os.stat(dev)
        if not stat.S_ISCHR(st.st_mode):
            return KvmProbe(False, VERDICT_BROKEN, f"{dev} is not a character device",
                            {}, time.monotonic() - t0)
    except OSError as e:
        return KvmProbe(False, VERDICT_BROKEN, f"stat {dev}: {e.strerror}", {},
                        time.monotonic() - t0)
    if not os.access(dev, os.R_OK | os.W_OK):
        return KvmProbe(False, VERDICT_PERM,
                        f"open {dev}: EACCES (mode {stat.filemode(st.st_mode)}, uid {st.st_uid}, "
                        f"gid {st.st_gid}; this process runs as uid {os.getuid()}); add the user "
                        "to the group owning /dev/kvm (usually kvm) or run as root",
                        {"error": {"stage": "open", "errno": "EACCES"}}, time.monotonic() - t0)
    rec, problem = _run_child(dev, timeout)
    secs = time.monotonic() - t0
    if rec is None:
        if problem.startswith("timeout"):
            return KvmProbe(False, VERDICT_TIMEOUT, problem, {"error": {"stage": "KVM_RUN",
                                                                         "errno": "ETIME"}}, secs)
        return KvmProbe(False, VERDICT_BROKEN, problem, {}, secs)
    usable, verdict, detail = verdict_from_record(rec)
    return KvmProbe(usable, verdict, detail, rec, secs)


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
    from kvmlab.host import cpu
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
    from kvmlab.host import cpu
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
    from kvmlab.host import modules as kmod
    rep = kmod.modules_report()
    mods = rep.modules
    vendor_mod = kmod.VENDOR_MODULE.get(ident.get("vendor", ""), "")
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
        import grp
        group = grp.getgrgid(st.st_gid).gr_name
    except (KeyError, ImportError):
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


def doctor(*, timeout: float = 10, dev: str = kvmapi.DEV_KVM) -> DoctorReport:
    """Run every host check and the probe guest; never raises for a failing check."""
    from kvmlab.host import cpu
    ident = cpu.cpu_identity()
    try:
        _kv, flags = cpu.cpuinfo_flags()
    except OSError:
        flags = set()
    checks = [_check_cpu(ident), _check_virt(ident, flags), _check_hypervisor(ident, flags),
              _check_firmware(ident), _check_vmx_caps(ident), *_check_modules(ident),
              _check_dev(dev), _check_api(dev)]
    probe = probe_kvm(timeout, dev)
    checks.append(_check_probe(probe))
    return DoctorReport(checks, probe, os.getuid())


def load_modules(ko: list[str] | None = None, *, unload: bool = False) -> ModulesResult:
    """Load (or with unload=True, rmmod) kvm + the module for this CPU's vendor.

    Raises ModulesUnsupported (a HostError) on a kernel without loadable-module support, other
    HostErrors with the kernel log's reason; see kvmlab.host.modules for the details."""
    from kvmlab.host import cpu
    from kvmlab.host import modules as kmod
    vendor = cpu.cpu_identity().get("vendor", "")
    if unload:
        return kmod.unload_modules(vendor)
    return kmod.load_modules(vendor, ko)


def explain_exit(text: str, kind: str = "auto") -> Any:
    """Decode a VM-exit reason, KVM_EXIT_* code, suberror or qemu message (kvmlab.host.exits)."""
    from kvmlab.host.exits import explain
    return explain(text, kind)


def _main(argv: list[str]) -> int:
    import argparse
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
