"""Checks of a KVM host: /dev/kvm is the KVM misc device with a sane mode, kvm is loaded or built
in, and the doctor's verdict matches the probe guest run on that host.

On local:// the probe runs in-process; on other hosts through
`python3 -m kvmlab.host.doctor --probe` (kvmlab must be importable there). The expected
/dev/kvm mode can be pinned with KVMLAB_VERIFY_KVM_MODE (octal, e.g. 0660).
"""
import json

import pytest

from kvmlab.host.doctor import doctor, probe_kvm

KVM_DEV = "/dev/kvm"
# udev's usual modes: 0660 root:kvm (Debian), 0666 (upstream systemd >= 230), 0600 root (bare
# kernels / devtmpfs without udev)
ACCEPTED_MODES = {0o600, 0o660, 0o666}


def _is_local(host):
    return getattr(host.backend, "NAME", "") == "local"


def test_dev_kvm_is_the_kvm_char_device(host, verify_env):
    f = host.file(KVM_DEV)
    assert f.exists, f"{KVM_DEV} missing: run `invoke doctor` to see why"
    out = host.check_output(f"stat -c '%t:%T %a %U %G %F' {KVM_DEV}")
    majmin, mode, user, group, ftype = out.split(None, 4)
    assert ftype == "character special file", f"{KVM_DEV} is a {ftype}"
    major, minor = (int(x, 16) for x in majmin.split(":"))
    assert (major, minor) == (10, 232), f"{KVM_DEV} is {major}:{minor}, expected 10:232"
    assert user == "root"
    mode_i = int(mode, 8)
    if verify_env.get("kvm_mode"):
        assert mode_i == int(verify_env["kvm_mode"], 8)
    else:
        assert mode_i in ACCEPTED_MODES, f"unexpected mode {mode}"
        if mode_i == 0o660 and host.group("kvm").exists:
            # (a container without a kvm group sees the host's gid unnamed: nothing to compare)
            assert group == "kvm", f"{KVM_DEV} is 0660 but group {group}, expected kvm"


def test_kvm_loaded_or_built_in(host):
    modules = host.file("/proc/modules")
    sysmod = host.file("/sys/module/kvm")
    if modules.exists and any(line.split()[:1] == ["kvm"]
                              for line in modules.content_string.splitlines()):
        return  # loaded as a module
    # built in: /sys/module/kvm without initstate, or /dev/kvm on a kernel without modules
    if sysmod.is_directory:
        assert not host.file("/sys/module/kvm/initstate").exists, "kvm: module but not live"
        return
    assert not modules.exists and host.file(KVM_DEV).exists, \
        "kvm is neither loaded (/proc/modules) nor built in (/sys/module/kvm)"


def _run_json(host, arg):
    r = host.run(f"python3 -m kvmlab.host.doctor {arg}")
    if r.rc != 0 and "No module named" in r.stderr:
        pytest.skip(f"kvmlab is not installed on {host.backend.get_hostname()}")
    assert r.rc == 0, r.stderr
    return json.loads(r.stdout)


def test_doctor_verdict_matches_probe(host):
    if _is_local(host):
        probe = probe_kvm(timeout=20).to_dict()
        rep = doctor(timeout=20).to_dict()
    else:
        probe = _run_json(host, "--probe --timeout 20")
        rep = _run_json(host, "--doctor --timeout 20")
    assert rep["verdict"] == probe["verdict"], (rep["verdict"], probe["detail"])
    assert rep["usable"] == probe["usable"]
    probe_check = next(c for c in rep["checks"] if c["name"] == "probe guest")
    assert probe_check["value"] == probe["verdict"]
    assert (probe_check["status"] == "ok") == probe["usable"]
