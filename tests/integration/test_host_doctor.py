"""doctor / probe / load-modules / explain-exit on the real machine (no fakes).

The assertions follow the probe's real record: on a machine whose /dev/kvm cannot run an
unmodified guest (the CI machines: paravirtual kvm_pvm, no VMX/SVM in CPUID) the verdict must say
so, and the record must show why (a failing KVM_RUN exit or guest code run by the emulator).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvmlab.host import cpu
from kvmlab.host import doctor as host
from kvmlab.host import modules as kmod

SRC = str(Path(host.__file__).resolve().parents[2])  # the directory holding kvmlab/


def _cpuinfo_flags() -> set[str]:
    return cpu.cpuinfo_flags()[1]


def test_probe_reports_this_machine_truthfully():
    p = host.probe_kvm(timeout=20)
    assert p.verdict and p.detail
    if not os.path.exists("/dev/kvm"):
        assert not p.usable
        assert p.verdict in (host.VERDICT_NO_DEV, host.VERDICT_NO_CPU, host.VERDICT_FIRMWARE)
        return
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        assert p.verdict == host.VERDICT_PERM and not p.usable
        return
    rec = p.record
    assert rec["api_version"] == 12, rec
    # The verdict is derived from what KVM_RUN did, nothing else.
    assert host.verdict_from_record(rec) == (p.usable, p.verdict, p.detail)
    guests = {g["guest"]: g for g in rec["guests"]}
    assert set(guests) == {"basic", "workload"}
    for g in guests.values():
        assert g["runs"], g  # KVM_RUN was really called and returned
        for ex in g["runs"]:
            assert ex["exit_name"] in p.detail
    flags = _cpuinfo_flags()
    if "vmx" not in flags and "svm" not in flags and "hypervisor" in flags:
        # A /dev/kvm without hardware virtualization cannot run an unmodified guest.
        assert not p.usable
        assert p.verdict == host.VERDICT_PARAVIRT
        wl = guests["workload"]
        failed = not wl["ok"]
        emulated = host.emulated(wl)
        assert failed or emulated, wl
        if failed:
            last = wl["runs"][-1]
            assert last["exit_name"] != "KVM_EXIT_HLT"
            if last["exit_name"] == "KVM_EXIT_INTERNAL_ERROR":
                assert f"suberror {last['suberror']}" in p.detail
    if p.usable:
        assert all(g["ok"] for g in guests.values())
        assert not host.emulated(guests["workload"])


def test_probe_timeout_kills_the_child():
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no accessible /dev/kvm: the probe child is not started")
    p = host.probe_kvm(timeout=0.001)
    assert not p.usable and p.verdict == host.VERDICT_TIMEOUT and "killed" in p.detail


def test_probe_main_prints_json():
    out = subprocess.run([sys.executable, "-m", "kvmlab.host.doctor", "--probe"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": SRC})
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert set(d) >= {"usable", "verdict", "detail"}


def test_doctor_json_cli(cli, kvmlab_env):
    r = cli("doctor", "--json", timeout=120)
    d = json.loads(r.stdout)
    p = host.probe_kvm(timeout=20)
    assert d["verdict"] == p.verdict and d["usable"] == p.usable
    # the exit status says whether KVM can run guests here; under --json the error is in the doc
    assert r.returncode == (0 if p.usable else 1), r.stderr
    if not p.usable:
        assert d["error"].startswith("KVM cannot run guests here") and d["hint"]
    lenient = cli("doctor", "--json", "--no-strict", timeout=120)
    assert lenient.returncode == 0, lenient.stderr
    assert "error" not in json.loads(lenient.stdout)
    names = [c["name"] for c in d["checks"]]
    for n in ("CPU", "virtualization extensions", "hypervisor", "kvm modules", "/dev/kvm",
              "KVM API", "probe guest"):
        assert n in names
    assert all(c["status"] in host.STATUSES for c in d["checks"])
    flags = _cpuinfo_flags()
    virt = next(c for c in d["checks"] if c["name"] == "virtualization extensions")
    assert (virt["status"] == "ok") == bool(virt["data"]["vmx"] or virt["data"]["svm"])
    assert virt["data"]["cpuinfo_vmx"] == ("vmx" in flags)
    hv = next(c for c in d["checks"] if c["name"] == "hypervisor")
    assert hv["data"]["hypervisor"] == ("hypervisor" in flags)
    mods = next(c for c in d["checks"] if c["name"] == "kvm modules")
    assert mods["data"]["supported"] == os.path.exists("/proc/modules")


def test_doctor_facts_are_stable_and_true():
    """facts() go into lab.lock.json: two runs must agree, and they must match the system."""
    a, b = host.doctor(timeout=20), host.doctor(timeout=20)
    assert a.facts() == b.facts()
    f = a.facts()
    assert f["verdict"] == a.probe.verdict and f["usable"] == a.probe.usable
    assert f["modules_supported"] == os.path.exists("/proc/modules")
    assert f["cpu"]["vendor"] == cpu.cpuinfo_flags()[0]["vendor_id"]
    if os.path.exists("/dev/kvm"):
        st = os.stat("/dev/kvm")
        assert (f["dev_kvm"]["major"], f["dev_kvm"]["minor"]) == \
            (os.major(st.st_rdev), os.minor(st.st_rdev))
        assert f["dev_kvm"]["mode"] == oct(st.st_mode & 0o7777)


def test_doctor_table_cli(cli, kvmlab_env):
    r = cli("doctor", timeout=120, env={"COLUMNS": "200"})
    usable = host.probe_kvm(timeout=20).usable
    assert r.returncode == (0 if usable else 1), r.stderr
    assert "verdict:" in r.stdout and "probe guest" in r.stdout
    if not usable:   # one error line + hint, after the table
        assert r.stderr.splitlines()[-2].startswith("error: KVM cannot run guests here")
        assert r.stderr.splitlines()[-1].startswith("hint: ")
    assert cli("doctor", "--no-strict", timeout=120).returncode == 0


def _nobody_python() -> str | None:
    for py in (sys.executable, "/usr/bin/python3"):
        try:
            r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                py, "-c", "import kvmlab.host.doctor"], capture_output=True,
                               timeout=30, cwd="/", env={"PYTHONPATH": SRC})
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0:
            return py
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to user nobody needs root")
def test_doctor_without_root():
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is not installed")
    py = _nobody_python()
    if py is None:
        pytest.skip(f"no python3 that user nobody may execute with {SRC} importable")
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", py, "-m",
                        "kvmlab.host.doctor", "--doctor"], capture_output=True, text=True, timeout=120,
                       cwd="/", env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": SRC})
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["uid"] == 65534
    checks = {c["name"]: c for c in d["checks"]}
    assert checks["CPU"]["status"] == "ok"
    if os.path.exists("/dev/kvm") and not (os.stat("/dev/kvm").st_mode & 0o006):
        # /dev/kvm is not world-accessible: everything behind it is root-only for nobody
        for n in ("/dev/kvm", "KVM API", "probe guest"):
            assert checks[n]["status"] == "unknown" and checks[n]["needs_root"], checks[n]
            assert checks[n]["shown_status"] == "unknown (needs root)"
        assert d["verdict"] == host.VERDICT_PERM and not d["usable"]


def _system_snapshot() -> dict:
    snap = {"sys_module": sorted(os.listdir("/sys/module")),
            "proc_modules": Path("/proc/modules").read_text()
            if os.path.exists("/proc/modules") else None}
    if os.path.exists("/dev/kvm"):
        st = os.stat("/dev/kvm")
        snap["dev_kvm"] = (st.st_mode, st.st_rdev, st.st_uid, st.st_gid)
    return snap


@pytest.mark.skipif(os.path.exists("/proc/modules"),
                    reason="this kernel supports modules: refusing is not the expected outcome "
                           "and tests must not load modules")
def test_load_modules_refused_without_module_support(cli, kvmlab_env):
    before = _system_snapshot()
    for args in (["load-modules"], ["load-modules", "--unload"]):
        r = cli(*args, timeout=60)
        assert r.returncode == 1
        assert "no loadable-module support" in r.stderr and "nothing was changed" in r.stderr
        assert "Traceback" not in r.stderr
    assert _system_snapshot() == before
    # the library call says the same (a ModulesUnsupported HostError) and changes nothing either
    with pytest.raises(host.ModulesUnsupported, match="no loadable-module support"):
        host.load_modules()
    with pytest.raises(kmod.ModulesUnsupported):
        host.load_modules(unload=True)
    assert _system_snapshot() == before


def test_explain_exit_cli(cli, kvmlab_env):
    r = cli("explain-exit", "0x80000022")
    assert r.returncode == 0, r.stderr
    assert "MSR loading" in r.stdout and "0x484" in r.stdout
    r = cli("explain-exit", "KVM internal error. Suberror: 1 emulation failure")
    assert r.returncode == 0 and "KVM_INTERNAL_ERROR_EMULATION" in r.stdout
    r = cli("explain-exit", "--code", "8", "--kind", "kvm-exit", "--json")
    assert json.loads(r.stdout)["name"] == "KVM_EXIT_SHUTDOWN"
    r = cli("explain-exit", "not-a-code")
    assert r.returncode == 1 and "error:" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.docker
def test_host_checks_on_a_docker_host(kvmlab_env):
    """The testinfra checks through docker:// use `python3 -m kvmlab.host.doctor --probe/--doctor` inside
    the container; its verdict is the host's (same kernel, same /dev/kvm)."""
    from kvmlab.build.images import docker_client, ensure_image
    from kvmlab.core.errors import DockerError
    from kvmlab.lab import verify
    try:
        client = docker_client(timeout=30)
    except DockerError as e:
        pytest.skip(f"docker daemon not reachable: {e.message}")
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm to pass into the container")
    img = ensure_image(kvmlab_env, "debian12", client=client, quiet=True)  # has python3
    name = f"kvmlab-host-test-{os.getpid()}"
    c = client.containers.run(f"{img.name}:{img.tag}", ["sleep", "600"], name=name, detach=True,
                              devices=["/dev/kvm:/dev/kvm:rwm"],
                              volumes={SRC: {"bind": "/opt/kvmlab-src", "mode": "ro"}},
                              environment={"PYTHONPATH": "/opt/kvmlab-src"})
    try:
        code, out = c.exec_run(["python3", "-m", "kvmlab.host.doctor", "--probe"])
        assert code == 0, out
        inside = json.loads(out)
        outside = host.probe_kvm(timeout=20)
        assert (inside["usable"], inside["verdict"]) == (outside.usable, outside.verdict)
        report = verify.run_checks(kvmlab_env, ["host"], [f"docker://{name}"])
        assert report.ok, [(r.name, r.status, r.message) for r in report.failed()]
    finally:
        c.remove(force=True)
