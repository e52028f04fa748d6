"""`invoke nested`: kvmlab's own steps inside a lab VM that has emulated SVM.

The lab VM (kvmlab.nested.labvm: the kmod recipe's target kernel from apt, a rootfs with python3,
sshd and kmod, booted by the distribution's qemu under TCG with ``-cpu max``) is a kvmlab lab
host. Into it go kvmlab's bundle (kvmlab.core.bundle) and the two build outputs
(out/<kmod recipe>/<builder>/, out/<qemu recipe>/<builder>/); then, over ssh, with
``PYTHONPATH=<root>/lib`` and KVMLAB_* pointing inside the VM, kvmlab itself runs:

1. ``load-modules --ko kvm.ko,kvm-amd.ko --json`` (our build; its vermagic check, dependency
   order, rollback; irqbypass/ccp come from the kernel package via modprobe), or
   ``load-modules --json`` with ``--modules distro`` (the kernel package's own);
2. ``doctor --json``: its verdict must be usable (and it says why kvm_intel is refused);
3. ``install`` + ``install-bios`` of the qemu-kvm build into the VM's /usr/local (its runtime
   libraries are in the rootfs: the build manifest's runtime_deps packages);
4. ``boot-test --accel kvm --guest tiny --qemu /usr/local/bin/qemu-system-x86_64``: the monitor's
   ``info kvm`` and KVM's exit counter prove KVM ran the guest.

Then ``kvmlab verify --step host,boot,nested --hosts <the lab VM>`` checks the in-guest state with
testinfra. Each step's output, the in-guest kernel log (dmesg.txt) and record.json are kept in
STATE/nested/<run>/. The lab VM and all it started are killed on error, Ctrl-C, SIGTERM and at
the timeout (``--keep`` leaves it up and prints the ssh command).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shlex
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kvmlab.build import kmodules
from kvmlab.core import proc
from kvmlab.core.bundle import make_bundle
from kvmlab.core.elf import read_modinfo
from kvmlab.core.errors import KvmlabError
from kvmlab.core.fsutil import atomic_write_bytes, read_json
from kvmlab.core.settings import Settings
from kvmlab.model.manifests import BuildManifest
from kvmlab.nested import kernel as kernel_mod
from kvmlab.nested import rootfs as rootfs_mod
from kvmlab.nested.labvm import LabVM, new_run_id
from kvmlab.nested.record import (
    MODULE_SOURCES,
    ModuleLoaded,
    NestedError,
    NestedOptions,
    NestedRecord,
)

ROOT = "/var/tmp/kvmlab-nested"          # kvmlab's home inside the lab VM
QEMU_INSIDE = "/usr/local/bin/qemu-system-x86_64"
STEP_TIMEOUT = {"push": 120.0, "load-modules": 120.0, "doctor": 120.0, "install": 180.0,
                "install-bios": 180.0, "boot-test": 240.0, "verify": 300.0}
KEEP_RUNS = 10
CPUINFO = "grep -m1 '^vendor_id' /proc/cpuinfo; grep -m1 '^flags' /proc/cpuinfo"
Progress = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# before the lab VM: both builds, the kernel, the rootfs


@dataclasses.dataclass(frozen=True)
class Builds:
    kmod_out: Path
    qemu_out: Path
    packages: tuple[str, ...]         # the qemu build's runtime packages (baked into the rootfs)
    modules: tuple[Path, ...]         # our .ko files to load (kvm + the SVM module)


def _manifest(settings: Settings, recipe: str, builder: str) -> Path:
    out = settings.out(recipe, builder)
    if not (out / "manifest.json").is_file():
        raise NestedError(f"no {recipe} build: {out}/manifest.json is missing",
                          hint=f"run `invoke build --recipe {recipe} --builder {builder}` first "
                               "(invoke nested needs both the kmod and the qemu-kvm build)")
    return out


def check_builds(settings: Settings, o: NestedOptions) -> Builds:
    """Both build outputs exist; the .ko files to load; the qemu build's runtime packages."""
    if o.modules not in MODULE_SOURCES:
        raise NestedError(f"--modules {o.modules!r}: not one of " + ", ".join(MODULE_SOURCES))
    kmod_out = _manifest(settings, o.recipe, o.builder)
    qemu_out = _manifest(settings, o.qemu_recipe, o.builder)
    kos = kmodules.modules_from(kmod_out)
    mods = tuple(p for p in kos if kmodules.module_name(p) in ("kvm", "kvm_amd"))
    m = BuildManifest.load(qemu_out / "manifest.json")
    pkgs = sorted({d.runtime_package for d in (m.runtime_deps or []) if d.runtime_package})
    return Builds(kmod_out, qemu_out, tuple(pkgs), mods)


# ---------------------------------------------------------------------------------------------
# inside the lab VM


def kvmlab_command(args: list[str], root: str = ROOT) -> str:
    """The shell line that runs ``python3 -m kvmlab ARGS`` inside with the bundle's kvmlab."""
    env = {"PYTHONPATH": f"{root}/lib", "KVMLAB_HOME": root, "KVMLAB_STATE_DIR": f"{root}/state",
           "KVMLAB_CACHE": f"{root}/cache", "KVMLAB_LOCK": f"{root}/state/kvmlab.lock",
           "TERM": "dumb", "COLUMNS": "200"}
    return (f"cd {root} && " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) +
            " python3 -m kvmlab " + " ".join(shlex.quote(a) for a in args))


class _Inside:
    """One run's lab VM: every in-guest step with its log, a deadline, the record."""

    def __init__(self, vm: LabVM, rec: NestedRecord, deadline: float):
        self.vm, self.rec, self.deadline = vm, rec, deadline
        self.dir = Path(rec.run_dir)
        self.cpuinfo = ""          # the lab VM's vendor_id and flags lines (read while pushing)

    def left(self, step: str) -> float:
        left = self.deadline - time.monotonic()
        if left <= 1:
            raise NestedError(f"nested: out of time before {step} (--timeout reached)",
                              hint="give a larger --timeout")
        return min(STEP_TIMEOUT.get(step, 120.0), left)

    def sh(self, step: str, cmd: str) -> proc.CompletedProcess:
        p = self.vm.run(cmd, timeout=self.left(step))
        log = self.dir / f"{step}.log"
        with open(log, "a") as f:
            f.write(f"$ {cmd}\n{p.stdout}{p.stderr}[exit {p.returncode}]\n")
        self.rec.steps[step] = str(log)
        return p

    def kvmlab(self, step: str, args: list[str]) -> proc.CompletedProcess:
        """kvmlab's own task inside; a failure is its own error line + hint, named by step."""
        p = self.sh(step, kvmlab_command(args))
        if p.returncode != 0:
            err, hint = _error_of(p)
            raise NestedError(f"inside the lab VM, `kvmlab {args[0]}` failed: {err}",
                              hint=(hint + "; " if hint else "") +
                              f"its output is in {self.dir / (step + '.log')}")
        return p

    def json_of(self, step: str, args: list[str]) -> dict[str, Any]:
        p = self.kvmlab(step, args)
        doc = _json_doc(p.stdout)
        if doc is None:
            raise NestedError(f"inside the lab VM, `kvmlab {args[0]} --json` printed no JSON",
                              hint=f"see {self.dir / (step + '.log')}")
        return doc


def _error_of(p: proc.CompletedProcess) -> tuple[str, str]:
    """(error, hint) of a failed kvmlab task: its `{"error", "hint"}` JSON document under --json,
    else its last `error:` / `hint:` lines."""
    doc = _json_doc(p.stdout)
    if doc is not None and doc.get("error"):
        return str(doc["error"]), str(doc.get("hint") or "")
    text = (p.stdout + p.stderr).splitlines()
    err = next((ln[len("error:"):].strip() for ln in reversed(text) if ln.startswith("error:")),
               f"exit {p.returncode}")
    hint = next((ln[len("hint:"):].strip() for ln in reversed(text) if ln.startswith("hint:")), "")
    return err, hint


def _json_doc(out: str) -> dict[str, Any] | None:
    """The JSON document a --json task printed on stdout (None: there is none)."""
    try:
        doc = json.loads(out[out.index("{"):])
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _timed(rec: NestedRecord, part: str) -> contextlib.AbstractContextManager[None]:
    @contextlib.contextmanager
    def cm() -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            setattr(rec.times, part, round(time.monotonic() - t0, 3))
    return cm()


def _push_tar(path: Path, settings: Settings, o: NestedOptions, b: Builds) -> None:
    """One plain tar (the lab VM unpacks it under TCG: no gzip) with kvmlab's bundle (lib/,
    recipes/, patches/) and state/out/<recipe>/<builder>/ of both builds."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(make_bundle(settings)), mode="r:gz") as src, \
            tarfile.open(fileobj=buf, mode="w") as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m) if m.isfile() else None)
        for recipe, out in ((o.recipe, b.kmod_out), (o.qemu_recipe, b.qemu_out)):
            dst.add(out, f"state/out/{recipe}/{o.builder}")
    atomic_write_bytes(path, buf.getvalue())


def _push(ins: _Inside, settings: Settings, o: NestedOptions, b: Builds) -> None:
    """kvmlab's bundle and the two build outputs into ROOT (one copy, one unpack: every ssh
    connection costs a key exchange under TCG); kvmlab importable there for testinfra."""
    tar = ins.dir / "push.tar"
    _push_tar(tar, settings, o, b)
    ins.vm.put(tar, f"{ROOT}.tar")
    tar.unlink()
    site = "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])')"
    p = ins.sh("push", f"rm -rf {ROOT} && mkdir -p {ROOT} && tar -xf {ROOT}.tar -C {ROOT} && "
                       f"rm {ROOT}.tar && d={site} && mkdir -p $d && "
                       f"echo {ROOT}/lib > $d/kvmlab-nested.pth && " + CPUINFO)
    ins.cpuinfo = p.stdout
    if p.returncode != 0:
        raise NestedError("cannot unpack kvmlab's bundle inside the lab VM",
                          hint=f"see {ins.dir / 'push.log'}")


def _cpu_inside(ins: _Inside, o: NestedOptions) -> None:
    """SVM (or VMX) in the lab VM's CPU, else one clear error naming --cpu."""
    text = ins.cpuinfo or ins.sh("cpu", CPUINFO).stdout
    flags = set(text.split("flags", 1)[-1].replace(":", " ").split())
    vendor = text.split(":", 1)[1].split("\n", 1)[0].strip() if ":" in text else "?"
    ins.rec.cpu = {"model": o.cpu, "vendor": vendor, "vmx": "vmx" in flags,
                   "svm": "svm" in flags, "npt": "npt" in flags}
    if not (flags & {"svm", "vmx"}):
        raise NestedError(f"the lab VM's CPU (-cpu {o.cpu}) offers neither SVM nor VMX: KVM "
                          "cannot load inside it",
                          hint="use --cpu max (qemu's TCG emulates AMD SVM with nested paging "
                               "there); a host qemu without SVM emulation cannot run this lab")


def _load_modules(ins: _Inside, o: NestedOptions, b: Builds) -> None:
    rec = ins.rec
    if o.modules == "built":
        inside = [f"{ROOT}/state/out/{o.recipe}/{o.builder}/{p.name}" for p in b.modules]
        res = ins.json_of("load-modules", ["load-modules", "--ko", ",".join(inside), "--json"])
    else:
        res = ins.json_of("load-modules", ["load-modules", "--json"])
    names = [n for n, st in res.get("state", {}).items() if st == "loaded"]
    deps = kmodules.external_depends(b.modules) if o.modules == "built" else ["irqbypass", "ccp"]
    script = "; ".join(f"echo {n} $(cat /sys/module/{n}/taint 2>/dev/null || echo -) "
                       f"$(modinfo -n {n} 2>/dev/null || echo -) "
                       f"$(modinfo -F vermagic {n} 2>/dev/null)" for n in [*deps, *names])
    p = ins.sh("load-modules", script)
    ours = {kmodules.module_name(k): k for k in b.modules}
    for line in p.stdout.splitlines():
        parts = line.split(None, 3)
        if len(parts) < 3:
            continue
        name, taint, path = parts[:3]
        if o.modules == "built" and name in ours:
            info = read_modinfo(ours[name])
            rec.modules.append(ModuleLoaded(
                name, f"{ROOT}/state/out/{o.recipe}/{o.builder}/{ours[name].name}",
                str(info.get("vermagic", "")).strip(), "built", taint.strip("-")))
        else:
            rec.modules.append(ModuleLoaded(name, path, parts[3].strip() if len(parts) > 3
                                            else "", "kernel package", taint.strip("-")))


def _modules_inside(ins: _Inside, o: NestedOptions, b: Builds) -> None:
    _cpu_inside(ins, o)
    _load_modules(ins, o, b)


def _doctor(ins: _Inside) -> None:
    rep = ins.json_of("doctor", ["doctor", "--json", "--timeout", "30"])
    rec = ins.rec
    rec.verdict, rec.usable = str(rep.get("verdict", "")), bool(rep.get("usable"))
    backend: dict[str, Any] = next((c for c in rep.get("checks", [])
                                    if c.get("name") == "KVM backend"), {})
    rec.backend = f"{backend.get('value', '')}: {backend.get('explanation', '')}"
    rec.refused = dict((backend.get("data") or {}).get("refused") or {})
    if not rec.usable:
        probe = rep.get("probe", {}).get("detail", "")
        raise NestedError(f"inside the lab VM the doctor says {rec.verdict!r}, not usable",
                          hint=f"{probe[:200]}; see {ins.dir / 'doctor.log'}")


def _install(ins: _Inside, o: NestedOptions) -> None:
    common = ["--recipe", o.qemu_recipe, "--builder", o.builder, "--no-verify"]
    ins.kvmlab("install", ["install", *common])
    ins.kvmlab("install-bios", ["install-bios", *common])


def _nested_boot(ins: _Inside) -> None:
    ins.kvmlab("boot-test", ["boot-test", "--accel", "kvm", "--guest", "tiny", "--qemu",
                             QEMU_INSIDE, "--no-verify"])
    p = ins.sh("boot-test", f"cat {ROOT}/state/vm/last-boot.json")
    try:
        r = json.loads(p.stdout)[0]
    except (ValueError, IndexError):
        raise NestedError("the boot record inside the lab VM is unreadable",
                          hint=f"see {ins.dir / 'boot-test.log'}") from None
    atomic_write_bytes(ins.dir / "last-boot.json", p.stdout.encode())
    rec = ins.rec
    rec.accel, rec.kvm_exits = str(r.get("accel", "")), r.get("kvm_exits")
    rec.nested_seconds, rec.qemu_version = r.get("seconds"), str(r.get("qemu_version", ""))


def verify_inside(ins: _Inside, settings: Settings, o: NestedOptions) -> None:
    """testinfra against the lab VM itself: `kvmlab verify --hosts <the lab VM>`."""
    env = {**os.environ, **settings.env(), "KVMLAB_RECIPE": o.qemu_recipe,
           "KVMLAB_VERIFY_RESULTS": str(ins.dir / "last-boot.json"),
           "KVMLAB_VERIFY_NESTED_ROOT": ROOT,
           "KVMLAB_VERIFY_NESTED_MODULES": ",".join(
               m.name for m in ins.rec.modules if m.source == "built")}
    env.pop("PYTEST_CURRENT_TEST", None)
    p = proc.run([sys.executable, "-m", "kvmlab", "verify", "--step", "host,boot,nested",
                  "--hosts", ins.vm.host_spec(), "--json"], timeout=ins.left("verify"), env=env,
                 what="kvmlab verify against the lab VM")
    (ins.dir / "verify.log").write_text(p.stderr + p.stdout)
    ins.rec.steps["verify"] = str(ins.dir / "verify.log")
    try:
        doc = json.loads(p.stdout)
    except ValueError:
        doc = {}
    doc = doc if isinstance(doc, dict) else {}
    # passed / failed / skipped counted apart ("5 passed, 1 skipped (reason)")
    ins.rec.verified = {"host,boot,nested": str(doc.get("summary") or
                                                ("passed" if p.returncode == 0 else "failed"))}
    if p.returncode != 0:
        err = doc.get("error") or f"exit {p.returncode}"
        raise NestedError(f"the checks against the lab VM failed: error: {err}",
                          hint=f"see {ins.dir / 'verify.log'}")


# ---------------------------------------------------------------------------------------------
# the whole run


def _steps_inside(ins: _Inside, settings: Settings, o: NestedOptions, b: Builds,
                  progress: Progress) -> None:
    rec = ins.rec
    for part, label, fn in (
            ("push", "pushing kvmlab and the builds", lambda: _push(ins, settings, o, b)),
            ("module_load", "load-modules", lambda: _modules_inside(ins, o, b)),
            ("doctor", "doctor", lambda: _doctor(ins)),
            ("install", "install + install-bios", lambda: _install(ins, o)),
            ("nested_boot", "boot-test --accel kvm", lambda: _nested_boot(ins)),
            ("verify", "verify (testinfra against the lab VM)",
             lambda: verify_inside(ins, settings, o))):
        progress(label)
        rec.failed = part
        with _timed(rec, part):
            fn()
    rec.failed = ""


def _after_failure(ins: _Inside) -> None:
    """What a failed step left behind inside: the kvm modules still loaded (none, after a
    refused load-modules: its rollback)."""
    with contextlib.suppress(KvmlabError, OSError):
        p = ins.vm.run("cut -d' ' -f1 /proc/modules", timeout=20)
        ins.rec.loaded_after_failure = sorted(
            n for n in p.stdout.split() if n in ("kvm", "kvm_amd", "kvm_intel"))


def _keep_dmesg(ins: _Inside) -> None:
    with contextlib.suppress(KvmlabError, OSError):
        p = ins.dir / "dmesg.txt"
        atomic_write_bytes(p, ins.vm.dmesg().encode())
        ins.rec.dmesg = str(p)


def new_record(settings: Settings, o: NestedOptions) -> NestedRecord:
    """The run's record; its directory STATE/nested/<run> is the lab VM's (LabVM.boot makes it)."""
    run = new_run_id()
    return NestedRecord(run=run, run_dir=str(settings.state_dir / "nested" / run),
                        options=dataclasses.asdict(o))


def run_nested(settings: Settings, o: NestedOptions,
               progress: Progress = lambda _s: None) -> NestedRecord:
    """The whole nested lab (see the module docstring). Raises NestedError (or the KvmlabError
    of the step) with the record written, and the lab VM killed unless --keep."""
    t0 = time.monotonic()
    deadline = t0 + o.timeout
    b = check_builds(settings, o)
    release = o.kernel_release or kernel_mod.recipe_release(settings, o.recipe)
    progress(f"kernel {release}")
    kern = kernel_mod.fetch_kernel(settings, release)
    progress("rootfs")
    rootfs = rootfs_mod.build_rootfs(settings, kern, extra_packages=b.packages)
    rec = new_record(settings, o)
    rec.kernel = {"release": kern.release, "package_version": kern.package_version,
                  "vmlinuz": str(kern.vmlinuz)}
    try:
        with proc.sigterm_as_interrupt():
            progress("lab VM boot (TCG)")
            with LabVM.boot(settings, kern, rootfs, cpu=o.cpu, memory=o.memory,
                            timeout=max(1.0, deadline - time.monotonic()), run_id=rec.run) as vm:
                rec.times.lab_vm_boot = vm.times.launch_to_sshd
                _with_vm(_Inside(vm, rec, deadline), settings, o, b, progress)
    except KvmlabError as e:
        rec.failed = rec.failed or "lab VM boot"
        rec.error = e.message
        raise
    finally:
        rec.times.total = round(time.monotonic() - t0, 3)
        rec.write()
        _prune(settings.state_dir / "nested")
    return rec


def _with_vm(ins: _Inside, settings: Settings, o: NestedOptions, b: Builds,
             progress: Progress) -> None:
    try:
        _steps_inside(ins, settings, o, b, progress)
    except KvmlabError:
        _after_failure(ins)
        raise
    finally:
        _keep_dmesg(ins)
    if o.keep:
        ins.vm.keep()
        ins.rec.ssh = ins.vm.ssh_command()


def _prune(base: Path, keep: int = KEEP_RUNS) -> None:
    with contextlib.suppress(OSError):
        runs = sorted((d for d in base.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime)
        for d in runs[:-keep]:
            for f in sorted(d.rglob("*"), reverse=True):
                f.unlink() if not f.is_dir() else f.rmdir()
            d.rmdir()


def last_record(settings: Settings) -> dict[str, Any] | None:
    """The newest run's record.json (for `invoke verify --step nested` without a run)."""
    base = settings.state_dir / "nested"
    runs = sorted(base.glob("*/record.json"), key=lambda p: p.stat().st_mtime) \
        if base.is_dir() else []
    return read_json(runs[-1]) if runs else None
