"""Kernel-module state of KVM (loaded / built-in / available / absent) and load-modules.

Every function takes ``root`` (default "/") so the classification can be checked against a
directory tree; the real system is read otherwise. Nothing here changes the system except
``load_modules`` / ``unload_modules``, which run modprobe/insmod/rmmod.
"""
from __future__ import annotations

import gzip
import os
import platform
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvmlab.build import kmodules as kmodbuild
from kvmlab.core import proc
from kvmlab.core.errors import HostError, KvmlabError

KVM_MODULES = ("kvm", "kvm_intel", "kvm_amd", "kvm_pvm")
VENDOR_MODULE = {"GenuineIntel": "kvm_intel", "AuthenticAMD": "kvm_amd", "HygonGenuine": "kvm_amd",
                 "CentaurHauls": "kvm_intel", "  Shanghai  ": "kvm_intel"}
INTERESTING_PARAMS = ("nested", "ept", "npt", "unrestricted_guest", "enable_apicv", "avic",
                      "vpid", "pml", "ignore_msrs", "enable_virt_at_load", "force",
                      "emulate_invalid_guest_state")


def _p(root: Path | str, path: str) -> Path:
    return Path(root) / path.lstrip("/")


def modules_supported(root: Path | str = "/") -> bool:
    """Loadable-module support: /proc/modules exists only with CONFIG_MODULES=y."""
    return _p(root, "/proc/modules").exists()


def kernel_release() -> str:
    return platform.release()


def kernel_config(root: Path | str = "/", release: str | None = None) -> dict[str, str]:
    """CONFIG_* values from /proc/config.gz or /boot/config-RELEASE ({} when neither)."""
    release = release or kernel_release()
    text = ""
    gz = _p(root, "/proc/config.gz")
    try:
        if gz.exists():
            text = gzip.decompress(gz.read_bytes()).decode("utf-8", "replace")
        elif _p(root, f"/boot/config-{release}").exists():
            text = _p(root, f"/boot/config-{release}").read_text()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"(CONFIG_\w+)=(.*)", line)
        if m:
            out[m.group(1)] = m.group(2)
        else:
            m = re.match(r"# (CONFIG_\w+) is not set", line)
            if m:
                out[m.group(1)] = "n"
    return out


def proc_modules(root: Path | str = "/") -> dict[str, int]:
    """{module: refcount} from /proc/modules ({} without module support)."""
    out: dict[str, int] = {}
    try:
        for line in _p(root, "/proc/modules").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3:
                out[parts[0]] = int(parts[2]) if parts[2].isdigit() else 0
    except OSError:
        pass
    return out


def _module_file(root: Path | str, release: str, name: str) -> str | None:
    """Path of NAME's .ko in /lib/modules/RELEASE (via modules.dep), or None."""
    base = _p(root, f"/lib/modules/{release}")
    dep = base / "modules.dep"
    pat = re.compile(r"(^|/)" + re.escape(name).replace("_", "[_-]") + r"\.ko(\.[a-z]+)?$")
    try:
        for line in dep.read_text().splitlines():
            path = line.split(":", 1)[0]
            if pat.search(path):
                return str(base / path)
    except OSError:
        pass
    return None


def _builtin_listed(root: Path | str, release: str, name: str) -> bool:
    try:
        text = _p(root, f"/lib/modules/{release}/modules.builtin").read_text()
    except OSError:
        return False
    pat = re.compile(r"(^|/)" + re.escape(name).replace("_", "[_-]") + r"\.ko$", re.M)
    return bool(pat.search(text))


@dataclass
class ModuleState:
    name: str
    state: str        # loaded | built-in | available | absent
    detail: str
    params: dict[str, str] = field(default_factory=dict)
    refcount: int | None = None

    def present(self) -> bool:
        return self.state in ("loaded", "built-in")


def read_params(name: str, root: Path | str = "/") -> dict[str, str]:
    d = _p(root, f"/sys/module/{name}/parameters")
    out: dict[str, str] = {}
    try:
        entries = sorted(d.iterdir())
    except OSError:
        return out
    for p in entries:
        try:
            out[p.name] = p.read_text().strip()
        except OSError as e:
            out[p.name] = f"<unreadable: {e.strerror}>"
    return out


def module_state(name: str, root: Path | str = "/", release: str | None = None,
                 config: dict[str, str] | None = None) -> ModuleState:
    """Classify one module (see ModuleState.state)."""
    release = release or kernel_release()
    sysdir = _p(root, f"/sys/module/{name}")
    loaded = proc_modules(root)
    cfg_key = "CONFIG_" + name.upper()
    cfg = (config or {}).get(cfg_key)
    params = read_params(name, root)
    if name in loaded:
        refs = loaded[name]
        try:  # /sys/module/NAME/refcnt is the same counter; prefer it when present
            refs = int((sysdir / "refcnt").read_text().strip())
        except (OSError, ValueError):
            pass
        return ModuleState(name, "loaded", f"loaded as a module (refcount {refs})", params, refs)
    if sysdir.exists() and not (sysdir / "initstate").exists():
        signs = [f"/sys/module/{name} without initstate"]
        if cfg == "y":
            signs.append(f"{cfg_key}=y")
        if _builtin_listed(root, release, name):
            signs.append("listed in modules.builtin")
        return ModuleState(name, "built-in", "built into the kernel (" + ", ".join(signs) + ")",
                           params)
    if cfg == "y":
        return ModuleState(name, "built-in", f"built into the kernel ({cfg_key}=y)", params)
    ko = _module_file(root, release, name)
    if ko:
        return ModuleState(name, "available", f"not loaded; module file {ko}", params)
    if not _p(root, f"/lib/modules/{release}").exists():
        why = f"not loaded and no /lib/modules/{release}"
    else:
        why = f"not loaded and not found in /lib/modules/{release}/modules.dep"
    if cfg == "n":
        why += f" ({cfg_key} is not set)"
    return ModuleState(name, "absent", why, params)


@dataclass
class ModulesReport:
    supported: bool
    release: str
    detail: str
    modules: dict[str, ModuleState]

    def to_dict(self) -> dict[str, Any]:
        return {"supported": self.supported, "release": self.release, "detail": self.detail,
                "modules": {k: asdict(v) for k, v in self.modules.items()}}


def modules_report(root: Path | str = "/", release: str | None = None) -> ModulesReport:
    release = release or kernel_release()
    cfg = kernel_config(root, release)
    supported = modules_supported(root)
    if supported:
        detail = "loadable modules supported (/proc/modules present)"
    else:
        bits = ["no /proc/modules"]
        if cfg.get("CONFIG_MODULES") == "n":
            bits.append("CONFIG_MODULES is not set")
        if not _p(root, f"/lib/modules/{release}").exists():
            bits.append(f"no /lib/modules/{release}")
        detail = "this kernel has no loadable-module support (" + ", ".join(bits) + ")"
    mods = {n: module_state(n, root, release, cfg) for n in KVM_MODULES}
    return ModulesReport(supported, release, detail, mods)


# ---------------------------------------------------------------------------------------------
# Users of KVM (for --unload)

def kvm_users(root: Path | str = "/") -> list[str]:
    """Processes holding /dev/kvm or a KVM VM fd open, plus running qemu processes."""
    users: list[str] = []
    proc = _p(root, "/proc")
    try:
        pids = [d for d in os.listdir(proc) if d.isdigit()]
    except OSError:
        return users
    for pid in pids:
        if int(pid) == os.getpid():
            continue
        try:
            comm = (proc / pid / "comm").read_text().strip()
        except OSError:
            continue
        why = ""
        try:
            for fd in os.listdir(proc / pid / "fd"):
                try:
                    target = os.readlink(proc / pid / "fd" / fd)
                except OSError:
                    continue
                if target == "/dev/kvm" or target.startswith("anon_inode:kvm"):
                    why = target
                    break
        except OSError:
            pass
        if not why and comm.startswith("qemu"):
            why = "qemu process"
        if why:
            users.append(f"{pid} ({comm}: {why})")
    return users


# ---------------------------------------------------------------------------------------------
# Failure explanations from the kernel log

_FAILURES: list[tuple[str, str, str]] = [
    (r"disabled by bios|VMX not enabled \(by BIOS\)|SVM disabled \(by BIOS\)|"
     r"VMX disabled by BIOS|virtualization.*disabled.*(bios|firmware)",
     "virtualization is disabled in the firmware (BIOS/UEFI)",
     "enable Intel VT-x / AMD-V (SVM) in the firmware setup, then power the machine off and on"),
    (r"no hardware support|VMX not supported|SVM not supported|not supported by CPU|"
     r"kvm: no virtualization",
     "the CPU does not offer VMX/SVM to this kernel",
     "on bare metal the CPU lacks VT-x/AMD-V; in a VM enable nested virtualization on the "
     "outer host (kvm_intel nested=1 / kvm_amd nested=1, -cpu host)"),
    (r"in use|Device or resource busy",
     "the module is in use",
     "stop the VMs using KVM (qemu processes) first"),
    (r"not found in directory /lib/modules|could not open moddep file|"
     r"FATAL: Module \S+ not found|/lib/modules/\S+: No such file or directory",
     "the kernel's module directory has no such module (missing /lib/modules/$(uname -r))",
     "install the modules package of the running kernel (linux-image-$(uname -r)) or pass "
     "the .ko files with --ko"),
    (r"Invalid module format|Unknown symbol|disagrees about version",
     "the .ko file was built for a different kernel",
     "use modules built for $(uname -r)"),
    (r"Key was rejected|Required key not available|Lockdown",
     "the module signature was rejected (Secure Boot / lockdown)",
     "use signed modules or enroll the signing key (mokutil)"),
    (r"Operation not permitted",
     "not permitted (needs root and CAP_SYS_MODULE)",
     "run as root"),
]


def explain_module_failure(output: str, kernel_log: str = "") -> tuple[str, str]:
    """(reason, hint) for a failed modprobe/insmod/rmmod from its output and the kernel log."""
    for text in (kernel_log, output):
        for pat, reason, hint in _FAILURES:
            if re.search(pat, text, re.I):
                return reason, hint
    return "unknown failure", "see `dmesg | tail` for the kernel's message"


def kernel_log_tail(lines: int = 30) -> str:
    """The last kvm/svm/vmx lines of the kernel log ('' when dmesg is not readable)."""
    try:
        p = proc.run(["dmesg"], timeout=10)
    except (OSError, KvmlabError):
        return ""
    hits = [ln for ln in p.stdout.splitlines() if re.search(r"kvm|svm|vmx|msr", ln, re.I)]
    return "\n".join(hits[-lines:])


# ---------------------------------------------------------------------------------------------
# load / unload

class ModulesUnsupported(HostError):
    """The running kernel has no loadable-module support: nothing can be loaded or unloaded."""

@dataclass
class ModulesResult:
    changed: bool
    actions: list[str]
    target: str
    state: dict[str, str]

    @property
    def summary(self) -> str:
        return "; ".join(self.actions)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "summary": self.summary}


# how modprobe/insmod/rmmod are run: kvmlab.core.proc.run (tests pass a fake with its signature)
Runner = Callable[..., proc.CompletedProcess]


def _run(cmd: list[str], runner: Runner) -> proc.CompletedProcess:
    # a missing kmod is proc's ToolMissing (apt-get install kmod); a hang its CommandTimeout
    return runner(cmd, timeout=60, what=" ".join(cmd))


def _load(cmd: list[str], runner: Runner, actions: list[str]) -> None:
    """modprobe/insmod one module; a failure is explained from its output and the kernel log."""
    p = _run(cmd, runner)
    if p.returncode != 0:
        reason, hint = explain_module_failure(p.stderr + p.stdout, kernel_log_tail())
        raise HostError(f"{' '.join(cmd)} failed: {reason} "
                        f"({(p.stderr or p.stdout).strip()[:200]})", hint=hint)
    actions.append(" ".join(cmd))


def _order_ko(paths: list[str]) -> list[str]:
    """kvm.ko first (the vendor module depends on it), then the others as given."""
    def is_kvm(p: str) -> bool:
        return re.sub(r"\.ko(\.[a-z]+)?$", "", Path(p).name) == "kvm"
    return [p for p in paths if is_kvm(p)] + [p for p in paths if not is_kvm(p)]


def target_module(vendor: str) -> str:
    mod = VENDOR_MODULE.get(vendor)
    if not mod:
        raise HostError(f"unknown CPU vendor {vendor!r}: cannot pick kvm_intel or kvm_amd",
                        hint="pass the module files with --ko")
    return mod


def load_modules(vendor: str, ko: list[str] | None = None, *, root: Path | str = "/",
                 runner: Runner = proc.run) -> ModulesResult:
    """Load kvm + the vendor module (modprobe, or insmod of the given .ko files, kvm first).

    Idempotent: nothing is run when both are loaded or built in. Raises HostError (changing
    nothing) on a kernel without loadable-module support, or with the kernel log's reason when
    loading fails."""
    target = target_module(vendor)
    rep = modules_report(root)
    mods = rep.modules
    state = {n: m.state for n, m in mods.items()}
    if mods["kvm"].present() and mods[target].present():
        how = {n: mods[n].state for n in ("kvm", target)}
        return ModulesResult(False, [f"nothing to do: kvm {how['kvm']}, {target} {how[target]}"],
                             target, state)
    if not rep.supported:
        present = [f"{n} ({m.state})" for n, m in mods.items() if m.present()]
        raise ModulesUnsupported(
            f"{rep.detail}: cannot load {target}; nothing was changed" +
            (f". KVM here: {', '.join(present)}" if present else ""),
            hint="modules can only be added by booting a kernel built with them (CONFIG_KVM_"
                 f"{'INTEL' if target == 'kvm_intel' else 'AMD'}=y) or with CONFIG_MODULES=y")
    actions: list[str] = []
    if ko:
        missing = [p for p in ko if not Path(p).is_file()]
        if missing:
            raise HostError(f"module file not found: {', '.join(missing)}")
        ordered = [str(p) for p in kmodbuild.load_order(_order_ko(ko))]
        release = kernel_release()
        for path in ordered:  # every module is checked before the first insmod
            kmodbuild.check_vermagic(path, release, root=root)
        for dep in kmodbuild.external_depends(ordered):  # e.g. irqbypass, ccp
            if not (Path(root) / "sys/module" / dep).exists():
                _load(["modprobe", dep], runner, actions)
        inserted: list[str] = []
        try:
            for path in ordered:
                name = re.sub(r"\.ko(\.[a-z]+)?$", "", Path(path).name).replace("-", "_")
                if mods.get(name) and mods[name].present():
                    actions.append(f"{name} already {mods[name].state}")
                    continue
                _load(["insmod", path], runner, actions)
                inserted.append(name)
        except HostError:
            for name in reversed(inserted):  # back to the modules that were there before
                _run(["rmmod", name], runner)
            raise
    else:
        _load(["modprobe", target], runner, actions)
    after = modules_report(root)
    state = {n: m.state for n, m in after.modules.items()}
    if not (after.modules["kvm"].present() and after.modules[target].present()):
        reason, hint = explain_module_failure("", kernel_log_tail())
        raise HostError(f"{target} is still not loaded after {', '.join(actions)}: {reason}",
                        hint=hint)
    return ModulesResult(True, actions, target, state)


def unload_modules(vendor: str, *, root: Path | str = "/",
                   runner: Runner = proc.run) -> ModulesResult:
    """rmmod the vendor module and kvm; refuses while KVM is in use or modules are built in."""
    target = target_module(vendor)
    rep = modules_report(root)
    mods = rep.modules
    state = {n: m.state for n, m in mods.items()}
    if not rep.supported:
        raise ModulesUnsupported(f"{rep.detail}: nothing can be unloaded; nothing was changed",
                        hint="kvm is part of the kernel image here" if mods["kvm"].present()
                        else None)
    builtin = [n for n in ("kvm", target) if mods[n].state == "built-in"]
    if builtin:
        raise HostError(f"{', '.join(builtin)} built into the kernel: cannot be unloaded")
    loaded = [n for n in (target, "kvm") if mods[n].state == "loaded"]
    if not loaded:
        return ModulesResult(False, ["nothing to do: kvm modules are not loaded"], target, state)
    users = kvm_users(root)
    refs = {n: mods[n].refcount for n in loaded if mods[n].refcount}
    holders = [f"{n} refcount {c}" for n, c in refs.items() if c and (n == target or c > 1)]
    if users or holders:
        raise HostError("KVM is in use; refusing to unload: " + "; ".join(holders + users),
                        hint="stop these VMs (qemu processes) first")
    actions = []
    for n in loaded:
        p = _run(["rmmod", n], runner)
        if p.returncode != 0:
            reason, hint = explain_module_failure(p.stderr + p.stdout, kernel_log_tail())
            raise HostError(f"rmmod {n} failed: {reason} ({p.stderr.strip()[:200]})", hint=hint)
        actions.append(f"rmmod {n}")
    after = modules_report(root)
    return ModulesResult(True, actions, target, {n: m.state for n, m in after.modules.items()})
