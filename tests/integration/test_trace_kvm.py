"""trace-kvm for real: strace, gdb, this machine's /dev/kvm and a qemu-kvm 0.12 build."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _need_kvm():
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm on this machine (trace-kvm traces KVM's start)")


def _invoke(*args: str, env: dict | None = None, timeout: float = 300):
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=REPO,
                          env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def _trace(qemu: Path, *extra: str) -> dict:
    r = _invoke("trace-kvm", "--qemu", str(qemu), "--json", *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def _strace_own_names(qemu: Path, guest_args: list[str]) -> list[str]:
    """The same run, decoded by strace's own tables (no -X raw): KVM_* names in order."""
    p = subprocess.run(["strace", "-f", "-qq", "-yy", "-e", "trace=ioctl", str(qemu), *guest_args],
                       capture_output=True, text=True, timeout=120)
    return re.findall(r"ioctl\(\d+<(?:/dev/kvm|anon_inode:kvm)[^,]*, (KVM_\w+|0x[0-9a-f]+)",
                      p.stderr)


def test_real_trace_of_012_names_the_failing_call(kvmlab_env, qemu_012):
    _need_kvm()
    rep = _trace(qemu_012.qemu)
    calls = [e for e in rep["events"] if e["kind"] in ("ioctl", "open")]
    assert calls and calls[0]["name"] == "open(/dev/kvm)"
    assert calls[1]["name"] == "KVM_GET_API_VERSION" and calls[1]["result"] == 12
    failed = [e for e in calls if e["result"] is not None and e["result"] < 0]
    if rep["status"] == "kvm-used":
        assert rep["kvm_runs"] > 0
        return
    # what the kernel returned in this run, read from the trace: the first failing call
    assert rep["status"] == "kvm-failed" and failed, rep["verdict"]
    first = failed[0]
    assert rep["failing"]["name"] == first["name"] and rep["failing"]["errno"] == first["errno"]
    assert f"{first['name']}" in rep["verdict"] and first["errno"] in rep["verdict"]
    assert rep["meaning"] and rep["check_next"]
    # qemu's own words come in time order after the failing call
    said = [e for e in rep["events"] if e["kind"] == "stderr"]
    assert said and all(e["t"] >= first["t"] for e in said if "KVM" in e["text"])
    # kvmlab's decoder and strace's own agree on every KVM ioctl of the same run
    guest = rep["argv"][rep["argv"].index("-no-reboot") + 1:]
    theirs = _strace_own_names(qemu_012.qemu, guest)
    ours = [e["name"] for e in calls if e["kind"] == "ioctl"]
    assert ours == theirs


def test_tcg_is_not_requested(kvmlab_env, qemu_012, distro_qemu):
    for q in (qemu_012.qemu, distro_qemu):
        rep = _trace(q, "--accel", "tcg")
        assert rep["status"] == "not-requested", rep["verdict"]
        assert "not requested" in rep["verdict"]
        assert ("-no-kvm" in rep["argv"]) == (q == qemu_012.qemu)


def test_table_for_people(kvmlab_env, qemu_012):
    _need_kvm()
    r = _invoke("trace-kvm", "--qemu", str(qemu_012.qemu))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "KVM_GET_API_VERSION" in r.stdout and "verdict:" in r.stdout


def test_gdb_stops_at_the_init_functions(kvmlab_env, qemu_012_debug):
    _need_kvm()
    if shutil.which("gdb") is None:
        pytest.skip("gdb is not installed (apt-get install gdb; .ci/setup does)")
    rep = _trace(qemu_012_debug.qemu, "--gdb")
    names = [c["function"] for c in rep["calls"]]
    assert names[:3] == ["kvm_init", "kvm_create_context", "kvm_create"]
    assert "kvm_create_vm" in names and all(c["returned"] for c in rep["calls"])
    vm = next(c for c in rep["calls"] if c["function"] == "kvm_create_vm")
    assert vm["value"] == 0
    if rep["failing"]:
        # the innermost failing function, its -errno and the way up to kvm_init
        assert rep["failing"]["value"] < 0 and rep["failing"]["backtrace"]
        assert any("kvm_init" in ln for ln in rep["failing"]["backtrace"])
        strace_rep = _trace(qemu_012_debug.qemu)
        if strace_rep["failing"]:
            import errno
            assert -rep["failing"]["value"] == getattr(errno, strace_rep["failing"]["errno"])


def _path_without(tmp: Path, *tools: str) -> str:
    """A PATH holding links to what the run needs, minus ``tools``."""
    d = tmp / "bin"
    d.mkdir()
    for name in ("python3", "sh", "dpkg", "dpkg-query", "qemu-img", "file"):
        found = shutil.which(name)
        if found and name not in tools:
            (d / name).symlink_to(found)
    return str(d)


@pytest.mark.parametrize("tool, extra", [("strace", []), ("gdb", ["--gdb"])])
def test_missing_tool_is_one_clear_error(kvmlab_env, tmp_path, distro_qemu, tool, extra):
    r = _invoke("trace-kvm", "--qemu", str(distro_qemu), *extra,
                env={"PATH": _path_without(tmp_path, tool)})
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert lines[-2].startswith("error: ") and tool in lines[-2]
    assert lines[-1] == f"hint: apt-get install {tool}"


HANGING_QEMU = """#!/bin/sh
case "$1" in
  -version) echo "QEMU emulator version 7.2.0"; exit 0 ;;
  -help) printf 'usage: qemu\\n-serial dev\\n-accel tcg\\n-display none\\n'; exit 0 ;;
esac
echo $$ > "$(dirname "$0")/pid"
exec sleep 600
"""


def test_a_hanging_guest_is_killed_at_the_timeout(kvmlab_env, tmp_path):
    q = tmp_path / "qemu-system-x86_64"
    q.write_text(HANGING_QEMU)
    q.chmod(0o755)
    rep = _trace(q, "--timeout", "2")
    assert rep["timed_out"] and "stopped after 2 s" in rep["verdict"]
    pid = int((tmp_path / "pid").read_text())
    assert not Path(f"/proc/{pid}").exists() or \
        Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_not_a_qemu(kvmlab_env, tmp_path):
    r = _invoke("trace-kvm", "--qemu", "/bin/true")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "error: --qemu" in r.stderr
