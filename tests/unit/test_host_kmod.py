"""Module-state classification and load/unload decisions against directory trees.

The trees mirror what real kernels expose (/proc/modules lines, /sys/module/NAME with or without
initstate, modules.dep / modules.builtin); the runner stands in for modprobe/insmod/rmmod and
edits /proc/modules the way the kernel would, so the decisions (order, idempotence, refusals) are
checked without touching this machine's kernel.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kvmlab.core.errors import HostError
from kvmlab.host import modules as kmod

REL = "6.1.0-9-amd64"


def make_root(tmp_path: Path, *, modules: bool = True, loaded=(), builtin=(), files=()):
    root = tmp_path / "root"
    (root / "proc").mkdir(parents=True)
    (root / "sys/module").mkdir(parents=True)
    if modules:
        (root / "proc/modules").write_text(
            "".join(f"{m} 1142784 0 - Live 0x0000000000000000\n" for m in loaded))
        for m in loaded:
            (root / f"sys/module/{m}").mkdir()
            (root / f"sys/module/{m}/initstate").write_text("live\n")
    for m in builtin:
        (root / f"sys/module/{m}/parameters").mkdir(parents=True)
    if files:
        d = root / f"lib/modules/{REL}"
        d.mkdir(parents=True)
        (d / "modules.dep").write_text("".join(
            f"kernel/arch/x86/kvm/{f}.ko.xz:{' kernel/arch/x86/kvm/kvm.ko.xz' if f != 'kvm' else ''}\n"
            for f in files))
    return root


def fake_runner(root: Path, calls: list, fail: str = ""):
    def run(cmd, **kw):
        calls.append(cmd)
        if fail:
            return subprocess.CompletedProcess(cmd, 1, "", fail)
        mods = (root / "proc/modules").read_text()
        names = []
        if cmd[0] == "modprobe":
            names = ["kvm", cmd[1]]
        elif cmd[0] == "insmod":
            names = [Path(cmd[1]).name.split(".")[0].replace("-", "_")]
        elif cmd[0] == "rmmod":
            lines = [ln for ln in mods.splitlines() if ln.split()[0] != cmd[1]]
            (root / "proc/modules").write_text("".join(ln + "\n" for ln in lines))
            return subprocess.CompletedProcess(cmd, 0, "", "")
        for n in names:
            if not any(ln.split()[0] == n for ln in mods.splitlines()):
                mods += f"{n} 1 0 - Live 0x0\n"
        (root / "proc/modules").write_text(mods)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return run


def test_classification(tmp_path, monkeypatch):
    monkeypatch.setattr(kmod, "kernel_release", lambda: REL)
    root = make_root(tmp_path, loaded=["kvm"], files=["kvm", "kvm-intel", "kvm-amd"])
    rep = kmod.modules_report(root)
    assert rep.supported
    assert rep.modules["kvm"].state == "loaded"
    assert rep.modules["kvm_intel"].state == "available"
    assert rep.modules["kvm_pvm"].state == "absent"


def test_no_module_support_is_detected_and_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(kmod, "kernel_release", lambda: REL)
    root = make_root(tmp_path, modules=False, builtin=["kvm", "kvm_pvm"])
    rep = kmod.modules_report(root)
    assert not rep.supported and "no loadable-module support" in rep.detail
    assert rep.modules["kvm"].state == "built-in"
    calls: list = []
    with pytest.raises(HostError, match="no loadable-module support.*nothing was changed"):
        kmod.load_modules("GenuineIntel", root=root, runner=fake_runner(root, calls))
    with pytest.raises(HostError, match="nothing can be unloaded"):
        kmod.unload_modules("GenuineIntel", root=root, runner=fake_runner(root, calls))
    assert calls == []


def test_builtin_vendor_module_needs_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(kmod, "kernel_release", lambda: REL)
    root = make_root(tmp_path, modules=False, builtin=["kvm", "kvm_amd"])
    res = kmod.load_modules("AuthenticAMD", root=root, runner=fake_runner(root, []))
    assert not res.changed and "built-in" in res.actions[0]


def test_modprobe_then_idempotent(tmp_path, monkeypatch):
    monkeypatch.setattr(kmod, "kernel_release", lambda: REL)
    root = make_root(tmp_path, files=["kvm", "kvm-intel"])
    calls: list = []
    res = kmod.load_modules("GenuineIntel", root=root, runner=fake_runner(root, calls))
    assert res.changed and calls == [["modprobe", "kvm_intel"]]
    res2 = kmod.load_modules("GenuineIntel", root=root, runner=fake_runner(root, calls))
    assert not res2.changed and len(calls) == 1


def test_insmod_orders_kvm_first(tmp_path, monkeypatch):
    monkeypatch.setattr(kmod, "kernel_release", lambda: REL)
    root = make_root(tmp_path)
    ko = tmp_path / "ko"
    ko.mkdir()
    (ko / "kvm-amd.ko").write_bytes(b"\x7fELF")
    (ko / "kvm.ko").write_bytes(b"\x7fELF")
    calls: list = []
    from kvmlab.build import kmodules as kmodbuild
    info = {"vermagic": f"{REL} SMP preempt mod_unload modversions ", "depends": ""}
    monkeypatch.setattr(kmodbuild, "read_modinfo", lambda p: dict(info))
    kmod.load_modules("AuthenticAMD", [str(ko / "kvm-amd.ko"), str(ko / "kvm.ko")], root=root,
                      runner=fake_runner(root, calls))
    assert [Path(c[1]).name for c in calls] == ["kvm.ko", "kvm-amd.ko"]


def test_insmod_refuses_other_vermagic_before_any_insmod(tmp_path, monkeypatch):
    monkeypatch.setattr(kmod, "kernel_release", lambda: REL)
    root = make_root(tmp_path)
    ko = tmp_path / "ko"
    ko.mkdir()
    for f in ("kvm.ko", "kvm-amd.ko"):
        (ko / f).write_bytes(b"\x7fELF")
    from kvmlab.build import kmodules as kmodbuild
    monkeypatch.setattr(kmodbuild, "read_modinfo", lambda p: {
        "vermagic": "5.10.0-30-amd64 SMP mod_unload modversions ", "depends": ""})
    calls: list = []
    with pytest.raises(kmodbuild.VermagicMismatch, match="5.10.0-30-amd64"):
        kmod.load_modules("AuthenticAMD", [str(ko / "kvm.ko"), str(ko / "kvm-amd.ko")], root=root,
                          runner=fake_runner(root, calls))
    assert calls == []


def test_modprobe_failure_explained(tmp_path, monkeypatch):
    monkeypatch.setattr(kmod, "kernel_release", lambda: REL)
    monkeypatch.setattr(kmod, "kernel_log_tail", lambda: "kvm: disabled by bios")
    root = make_root(tmp_path, files=["kvm", "kvm-intel"])
    with pytest.raises(HostError, match="disabled in the firmware") as ei:
        kmod.load_modules("GenuineIntel", root=root,
                          runner=fake_runner(root, [], fail="modprobe: ERROR: could not insert "
                                             "'kvm_intel': Operation not supported"))
    assert "firmware setup" in ei.value.hint


def test_unload_refused_while_in_use(tmp_path, monkeypatch):
    monkeypatch.setattr(kmod, "kernel_release", lambda: REL)
    root = make_root(tmp_path, loaded=["kvm", "kvm_intel"])
    (root / "proc/modules").write_text("kvm_intel 1 2 - Live 0x0\nkvm 1 1 kvm_intel, Live 0x0\n")
    calls: list = []
    with pytest.raises(HostError, match="in use"):
        kmod.unload_modules("GenuineIntel", root=root, runner=fake_runner(root, calls))
    assert calls == []


def test_unload(tmp_path, monkeypatch):
    monkeypatch.setattr(kmod, "kernel_release", lambda: REL)
    root = make_root(tmp_path, loaded=["kvm", "kvm_intel"])
    (root / "proc/modules").write_text("kvm_intel 1 0 - Live 0x0\nkvm 1 1 kvm_intel, Live 0x0\n")
    calls: list = []
    res = kmod.unload_modules("GenuineIntel", root=root, runner=fake_runner(root, calls))
    assert calls == [["rmmod", "kvm_intel"], ["rmmod", "kvm"]] and res.changed


def test_unload_refused_by_sysfs_refcnt(tmp_path, monkeypatch):
    """/sys/module/kvm_intel/refcnt counts open VMs too: 1 means a VM holds it."""
    monkeypatch.setattr(kmod, "kernel_release", lambda: REL)
    root = make_root(tmp_path, loaded=["kvm", "kvm_intel"])
    (root / "sys/module/kvm_intel/refcnt").write_text("1\n")
    calls: list = []
    with pytest.raises(HostError, match="kvm_intel refcount 1"):
        kmod.unload_modules("GenuineIntel", root=root, runner=fake_runner(root, calls))
    assert calls == []


def test_failed_insmod_removes_what_this_run_inserted(tmp_path, monkeypatch):
    monkeypatch.setattr(kmod, "kernel_release", lambda: REL)
    monkeypatch.setattr(kmod, "kernel_log_tail", lambda: "")
    root = make_root(tmp_path)
    ko = tmp_path / "ko"
    ko.mkdir()
    for f in ("kvm.ko", "kvm-intel.ko"):
        (ko / f).write_bytes(b"\x7fELF")
    from kvmlab.build import kmodules as kmodbuild
    monkeypatch.setattr(kmodbuild, "read_modinfo", lambda p: {
        "vermagic": f"{REL} SMP preempt mod_unload modversions ", "depends": ""})
    calls: list = []

    def runner(cmd, **kw):
        calls.append(cmd)
        ok = not (cmd[0] == "insmod" and cmd[1].endswith("kvm-intel.ko"))
        return subprocess.CompletedProcess(cmd, 0 if ok else 1, "",
                                           "" if ok else "insmod: ERROR: Operation not supported")
    with pytest.raises(HostError, match="insmod .*kvm-intel.ko failed"):
        kmod.load_modules("GenuineIntel", [str(ko / "kvm.ko"), str(ko / "kvm-intel.ko")],
                          root=root, runner=runner)
    assert calls[-1] == ["rmmod", "kvm"]
