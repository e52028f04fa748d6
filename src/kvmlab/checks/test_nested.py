"""Checks of the nested lab, run against the lab VM itself (``--hosts`` = its ssh address).

They read the lab VM's own state: the kvm modules live in /sys/module with the srcversion of
the out-of-tree taint of the .ko files kvmlab built (so ours are loaded, not the kernel package's
signed ones), kvm_intel absent and
VMX missing from the CPU, /dev/kvm there, and the boot record kvmlab wrote inside the lab VM
(accelerator kvm, KVM exits counted). Inputs (KVMLAB_VERIFY_*, set by kvmlab.nested.steps):
  nested_root     kvmlab's directory inside the lab VM
  nested_modules  comma-separated names of the built (out-of-tree) modules that must be loaded
Without them (plain `invoke verify --step nested` on a host) the checks are skipped.
"""
import json

import pytest


def _root(verify_env):
    root = verify_env.get("nested_root")
    if not root:
        pytest.skip("not checking a nested lab VM (no KVMLAB_VERIFY_NESTED_ROOT)")
    return root


def test_kvm_modules_live(host, verify_env):
    _root(verify_env)
    for name in ("kvm", "kvm_amd"):
        f = host.file(f"/sys/module/{name}/initstate")
        assert f.exists and f.content_string.strip() == "live", f"{name} is not loaded"
    assert host.check_output("stat -c %F:%t:%T /dev/kvm") == "character special file:a:e8", \
        "/dev/kvm is not the KVM misc device 10:232"


def test_our_modules_are_the_loaded_ones(host, verify_env):
    _root(verify_env)
    want = [m for m in verify_env.get("nested_modules", "").split(",") if m]
    if not want:
        pytest.skip("--modules distro: the kernel package's modules are loaded")
    for name in want:
        taint = host.file(f"/sys/module/{name}/taint").content_string.strip()
        # the kernel package's modules are signed, in-tree: no O; ours are built out of tree
        assert "O" in taint, f"{name} loaded is not the out-of-tree build (taint {taint!r})"


def test_kvm_intel_absent_without_vmx(host, verify_env):
    _root(verify_env)
    flags = host.check_output("grep -m1 '^flags' /proc/cpuinfo").split()
    assert "svm" in flags
    if "vmx" not in flags:
        assert not host.file("/sys/module/kvm_intel").exists, "kvm_intel loaded without VMX"


def test_boot_record_inside_says_kvm(host, verify_env):
    root = _root(verify_env)
    f = host.file(f"{root}/state/vm/last-boot.json")
    assert f.exists, f"no boot record inside the lab VM at {root}/state/vm/last-boot.json"
    runs = json.loads(f.content_string)
    assert runs and runs[0]["booted"], "the nested boot did not boot"
    assert runs[0]["accel"] == "kvm", f"nested boot ran under {runs[0]['accel']}"
    assert runs[0].get("kvm_exits"), "no KVM exits counted during the nested boot"
