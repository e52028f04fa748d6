"""`invoke nested`, for real: the kvm-kmod-6.1 modules built here loaded inside a lab VM (Debian's
qemu, TCG, -cpu max: emulated SVM), kvmlab's doctor "usable" there, and the qemu-kvm 0.12 build
booting the tiny guest under KVM inside (monitor + KVM exit counter). Failure paths: modules built
for another kernel (the lab VM boots the host's installed linux-image release: refused by the
vermagic check inside, nothing left loaded), a CPU without SVM, and a run that cannot finish in
its --timeout (the lab VM killed, no qemu left on the host).

The builds come from kvmlab itself in a temporary state dir (a session fixture: `invoke build
--recipe kvm-kmod-6.1` and the qemu-kvm 0.12 build of tests/support/qemu012.py).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvmlab.core.errors import KvmlabError
from kvmlab.core.settings import load_settings
from kvmlab.nested import steps as nested_steps
from kvmlab.nested.record import NestedOptions
from support import qemu012

pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.qemu]
REPO = Path(__file__).resolve().parents[2]
KMOD = "kvm-kmod-6.1"


def _env(base: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVMLAB_")}
    env.update(KVMLAB_HOME=str(REPO), KVMLAB_STATE_DIR=str(base / "state"),
               KVMLAB_CACHE=str(base / "cache"), KVMLAB_LOCK=str(base / "state" / "kvmlab.lock"),
               NO_COLOR="1", COLUMNS="200")
    return env


@pytest.fixture(scope="session")
def builds(tmp_path_factory, distro_qemu):
    """A state dir holding both builds: kvm-kmod-6.1 and qemu-kvm 0.12.1.2 (debian12)."""
    why = qemu012.unavailable_reason()
    if why:
        pytest.skip(why)
    base = tmp_path_factory.mktemp("nested")
    qemu012.build(qemu012.find_tarball(), base)
    p = subprocess.run([sys.executable, "-m", "invoke", "build", "--recipe", KMOD,
                        "--no-verify"], cwd=REPO, env=_env(base), capture_output=True,
                       text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return base


def _nested(base: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "invoke", "nested", *args], cwd=REPO,
                          env=_env(base), capture_output=True, text=True, timeout=timeout)


def _no_lab_vm_left() -> list[str]:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [ln for ln in ps.splitlines() if "kvmlab-labvm-" in ln and "qemu" in ln]


def _last_two(p: subprocess.CompletedProcess) -> list[str]:
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in p.stdout + p.stderr, p.stderr[-3000:]
    assert lines[-2].startswith("error: ") and lines[-1].startswith("hint: "), p.stderr[-2000:]
    return lines[-2:]


def test_nested_end_to_end_with_the_modules_built_here(builds):
    p = _nested(builds, "--json")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rec = json.loads(p.stdout[p.stdout.index("{"):])
    assert rec["kernel"]["release"] == "6.1.0-50-amd64" and rec["kernel"]["package_version"]
    built = {m["name"]: m for m in rec["modules"] if m["source"] == "built"}
    assert set(built) == {"kvm", "kvm_amd"}
    for m in built.values():
        assert m["vermagic"].startswith("6.1.0-50-amd64 ") and "O" in m["taint"]
        assert m["file"].endswith((".ko",)) and f"/out/{KMOD}/" in m["file"]
    assert {"irqbypass", "ccp"} <= {m["name"] for m in rec["modules"]}
    assert rec["verdict"] == "KVM usable" and rec["usable"]
    assert rec["cpu"]["svm"] and not rec["cpu"]["vmx"]
    assert "VMX absent" in rec["refused"]["kvm_intel"]
    assert rec["accel"] == "kvm" and rec["kvm_exits"] > 0
    assert rec["qemu_version"].startswith("0.12")
    verified = rec["verified"]["host,boot,nested"]        # "7 passed, 1 skipped (...)"
    assert re.match(r"[1-9]\d* passed", verified) and "failed" not in verified, verified
    run = Path(rec["run_dir"])
    assert json.loads((run / "record.json").read_text())["kvm_exits"] == rec["kvm_exits"]
    dmesg = (run / "dmesg.txt").read_text()
    assert "kvm: loading out-of-tree module taints kernel" in dmesg
    assert "Nested Paging enabled" in dmesg
    for step in ("load-modules", "doctor", "install", "install-bios", "boot-test", "verify"):
        assert (run / f"{step}.log").is_file(), step
    assert not _no_lab_vm_left()


def _other_installed_kernel() -> str | None:
    """A linux-image-6* release installed on this host other than the kmod recipe's."""
    out = subprocess.run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev} ${Package}\n",
                          "linux-image-6*"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        m = re.match(r"ii\s+linux-image-(6\.\S+-amd64)$", line.strip())
        if m and m.group(1) != "6.1.0-50-amd64":
            return m.group(1)
    return None


def test_modules_built_for_another_kernel_are_refused_inside(builds):
    release = _other_installed_kernel()
    if release is None:
        pytest.skip("no other linux-image-6* release installed on this host to boot")
    s = load_settings({"home": REPO, "state_dir": builds / "state", "cache": builds / "cache",
                       "lock": builds / "state" / "kvmlab.lock"})
    with pytest.raises(KvmlabError) as e:
        nested_steps.run_nested(s, NestedOptions(kernel_release=release, timeout=600))
    assert "was built for kernel 6.1.0-50-amd64" in e.value.message
    assert release in e.value.message and "nothing was loaded" in e.value.message
    rec = nested_steps.last_record(s)
    assert rec and rec["kernel"]["release"] == release and rec["failed"] == "module_load"
    assert rec["loaded_after_failure"] == []     # nothing of ours (nor kvm) left loaded
    assert not _no_lab_vm_left()


def test_cpu_without_svm_is_one_clear_error(builds):
    p = _nested(builds, "--cpu", "qemu64,-svm")
    assert p.returncode != 0
    err, hint = _last_two(p)
    assert "no SVM" in err and "-cpu max" in hint
    assert not _no_lab_vm_left()


def test_run_longer_than_its_timeout_is_killed(builds):
    p = _nested(builds, "--timeout", "6")
    assert p.returncode != 0
    err, _hint = _last_two(p)
    assert "did not answer within" in err or "out of time" in err
    assert not _no_lab_vm_left()
