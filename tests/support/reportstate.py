"""A lab state dir for the report tests, written in the real formats by kvmlab's own writers.

- lab.lock.json: tests/data/lab.lock.v1.json (a lock make_lock wrote)
- lab/run.json: kvmlab.lab.runlog.RunLog fed real StepOutcome records, plus the checks
  (runlog.add_checks) with one skipped and optionally one failed check
- out/<recipe>/<builder>/manifest.json: tests/data/pre-redesign/build-manifest.json (an older
  build: "copy" and "run" only) and the same manifest as a build now records it (configure, make,
  deps, collect)
- vm/runs/*/result.json: kvmlab.boot.result.BootResult.to_dict() of several qemu x accelerator x
  guest runs, one that never booted
- the lab's doctor stamp (kvmlab.lab.runner.stamp) with facts and the doctor table

``nasty`` puts HTML metacharacters into the names, messages and figures a page shows.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from kvmlab.boot import vm
from kvmlab.boot.result import BootResult
from kvmlab.core.errors import LabError
from kvmlab.core.fsutil import atomic_write_json
from kvmlab.core.settings import Settings
from kvmlab.lab import runlog, runner
from kvmlab.lab.steps import LabOptions, StepOutcome

DATA = Path(__file__).resolve().parent.parent / "data"
NASTY = "<script>alert('x')</script>&<b>"
Q012 = "0.12.1 (qemu-kvm-0.12.1.2)"
Q72 = "7.2.22 (Debian 1:7.2+dfsg-7+deb12u18)"
T0 = 1_796_000_000.0

# (qemu, accel, guest, seconds to marker or None: did not boot)
BOOTS = [(Q012, "tcg", "tiny", 0.12), (Q012, "tcg", "tiny", 0.14), (Q012, "tcg", "tiny", 0.13),
         (Q72, "tcg", "tiny", 0.09), (Q72, "tcg", "tiny", 0.08), (Q72, "kvm", "tiny", 0.05),
         (Q012, "tcg", "linux", 3.9), (Q72, "tcg", "linux", 1.6), (Q012, "kvm", "tiny", None)]

DOCTOR_FACTS = {"api_version": 12, "cpu": {"brand": "AMD EPYC", "family": 26, "model": 2,
                                           "stepping": 1, "vendor": "AuthenticAMD"},
                "hypervisor": "KVM", "modules": {"kvm": "built-in", "kvm_amd": "absent"},
                "svm": False, "usable": False, "vmx": False,
                "verdict": "KVM present but cannot run unmodified guests: use TCG"}


def _steps(nasty: bool, fail: bool) -> list[tuple[StepOutcome, float]]:
    fig = NASTY if nasty else "2 patch(es)"
    plan = [("fetch", "no-op", 0.1, "local, sha256 9763fc833752 (locked)"),
            ("patch", "ok", 0.9, fig), ("images", "no-op", 0.1, "kvmlab/debian12:2193"),
            ("build", "ok", 41.9, "51 artifacts"), ("install", "ok", 0.2, "4 file(s)"),
            ("install-bios", "ok", 0.2, "47 file(s)"), ("load-modules", "skipped", 0.0, "-"),
            ("doctor", "ok", 0.1, DOCTOR_FACTS["verdict"]), ("create-image", "ok", 0.1, "1G"),
            ("guest", "no-op", 0.0, "tiny"), ("boot-test", "ok", 0.2, "tiny: booted")]
    if fail:
        plan = plan[:4]
        plan[-1] = ("build", "failed", 12.5, "build of qemu-kvm failed (exit 2)")
    out, t = [], T0
    for name, status, secs, figure in plan:
        out.append((StepOutcome(name, status, secs, figure=figure), t))
        t += secs
    return out


def _run_log(s: Settings, recipe: str, nasty: bool, fail: bool) -> None:
    log = runlog.RunLog(s, LabOptions(recipe=recipe, builder="debian12"))
    log.doc["started"] = T0
    for out, started in _steps(nasty, fail):
        log.step(out, started)
    if fail:
        msg = f"build of {NASTY if nasty else 'qemu-kvm'} failed (exit 2)"
        log.failed("build", LabError(msg, hint="full log: build-debian12.log"))
    else:
        log.finish()
    last = log.doc["steps"][-1]
    log.doc["finished"] = last["started"] + last["seconds"]    # the run's own clock
    log.save()


def _checks(nasty: bool, failed_check: bool) -> list[dict]:
    rows = [{"host": "local", "step": "fetch", "name": "test_cached_file_has_the_recorded_sha256",
             "status": "passed", "message": ""},
            {"host": "local", "step": "build", "name": "test_binaries_are_x86_64_elf",
             "status": "passed", "message": ""},
            {"host": "local", "step": "host", "name": "test_kvm_modules_loaded",
             "status": "skipped", "message": "kernel has no module support"}]
    if failed_check:
        rows.append({"host": "local", "step": "boot",
                     "name": "test_serial_log_has_marker" + ("[<&>]" if nasty else ""),
                     "status": "failed", "message": "assert 'KVMLAB-BOOT-OK' in ''"})
    return rows


def _builds(s: Settings) -> None:
    old = json.loads((DATA / "pre-redesign" / "build-manifest.json").read_text())
    new = copy.deepcopy(old)
    new["seconds"] = 41.5
    new["timings"] = {"copy": 0.09, "run": 41.4, "configure": 1.61, "make": 39.43, "deps": 0.39,
                      "collect": 0.02}
    atomic_write_json(s.out("qemu-kvm-0.12.1.2", "debian12") / "manifest.json", new)
    old["builder"] = "centos6"
    atomic_write_json(s.out("qemu-kvm-0.12.1.2", "centos6") / "manifest.json", old)


def _boots(s: Settings) -> None:
    runs = vm.runs_dir(s)
    for i, (qemu, accel, guest, secs) in enumerate(BOOTS):
        d = runs / f"20261201-18{i:02d}05-{guest}-{i:06x}"
        d.mkdir(parents=True)
        r = BootResult(secs is not None, accel if secs is not None else "", secs,
                       d / "serial.log", qemu_version=qemu, guest=guest,
                       qemu=f"/opt/{qemu.split()[0]}/bin/qemu-system-x86_64", run_dir=d,
                       failure="" if secs is not None else "--accel kvm: KVM not usable here")
        (d / "result.json").write_text(json.dumps(r.to_dict(), indent=2))
    vm.write_last(s, [BootResult(True, "tcg", 0.13, runs / "gone" / "serial.log",
                                 qemu_version=Q012, guest="tiny", run_dir=runs / "gone")])


def _doctor(s: Settings) -> None:
    checks = [{"name": "CPU", "status": "ok", "value": "AuthenticAMD AMD EPYC",
               "explanation": "read with cpuid", "hint": ""},
              {"name": "virtualization extensions", "status": "fail", "value": "no VMX, no SVM",
               "explanation": "the CPU offers neither", "hint": "enable it in the BIOS"}]
    runner.stamp(s, "doctor").write({"kernel": "6.1"}, {
        "record": {"facts": DOCTOR_FACTS, "checks": checks}, "figure": DOCTOR_FACTS["verdict"]})


def make_state(s: Settings, *, nasty: bool = False, fail: bool = False,
               failed_check: bool = False) -> Settings:
    """Write the records into s.state_dir (see the module docstring); returns s."""
    s.state_dir.mkdir(parents=True, exist_ok=True)
    lock = json.loads((DATA / "lab.lock.v1.json").read_text())
    recipe = lock["recipe"]["name"]
    if nasty:
        lock["recipe"]["name"] = recipe = f"qemu-{NASTY}"
    atomic_write_json(runner.lock_path(s), lock)
    _run_log(s, recipe, nasty, fail)
    if not fail:
        runlog.add_checks(s, _checks(nasty, failed_check))
    _builds(s)
    _boots(s)
    _doctor(s)
    return s
