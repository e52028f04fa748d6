"""Whether /dev/kvm really runs an unmodified guest: the probe and the verdict derived from it.

``probe_kvm`` is the contract other steps use (the vm step picks KVM or TCG from it). It runs the
probe guests of kvmlab.host.kvmapi in a child process (killed after ``timeout``) and derives a
verdict from what the vCPU really did. Only the standard library and kvmlab.core.proc are
imported: ``python3 -m kvmlab.host.doctor --probe`` runs on hosts that have nothing else.
"""
from __future__ import annotations

import json
import os
import stat
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvmlab.core import proc
from kvmlab.core.errors import KvmlabError
from kvmlab.host import cpu, kvmapi

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
    try:
        p = proc.run(cmd, timeout=timeout, env=env, what="the KVM probe")
    except proc.CommandTimeout:
        # its process group was killed: a KVM_RUN that never returns cannot hang the caller
        return None, f"timeout: the probe did not finish within {timeout:g}s (killed)"
    except KvmlabError as e:
        return None, f"probe process could not start: {e.message}"
    if p.returncode != 0:
        tail = (p.stderr or "").strip().splitlines()[-1:] or [""]
        sig = f"signal {-p.returncode}" if p.returncode < 0 else f"status {p.returncode}"
        return None, f"probe process died ({sig}): {tail[0][:300]}"
    try:
        return json.loads(p.stdout), ""
    except ValueError:
        return None, f"probe printed no JSON: {p.stdout[:200]!r}"


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
