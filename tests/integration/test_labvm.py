"""The lab VM, for real: the kmod recipe's Debian kernel (from apt) + the labvm initramfs (from
docker) under Debian's qemu with TCG. Its sshd answers on 127.0.0.1, it has SVM, python3 runs,
the kernel's own kvm_amd loads and /dev/kvm appears; without SVM (-cpu qemu64,-svm: plain
qemu64 has svm under TCG) and with an /init that never starts sshd it is one clear error, and no
qemu is left running either way."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvmlab.core.errors import DockerError, VMError
from kvmlab.core.settings import load_settings
from kvmlab.nested import kernel as kernel_mod
from kvmlab.nested import rootfs as rootfs_mod
from kvmlab.nested.labvm import LabVM, NoSVMError, new_run_id

pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.qemu]


@pytest.fixture(scope="module")
def lab(tmp_path_factory, distro_qemu):
    """Settings with their own state and cache, the kernel and the rootfs (made once)."""
    from kvmlab.build.images import docker_client
    try:
        docker_client()
    except DockerError as e:
        pytest.skip(f"dockerd is not running: {e.message}")
    tmp = tmp_path_factory.mktemp("labvm")
    s = load_settings({"state_dir": tmp / "state", "cache": tmp / "cache"})
    k = kernel_mod.fetch_kernel(s, kernel_mod.recipe_release(s))
    return s, k, rootfs_mod.build_rootfs(s, k)


def _qemu_running(name: str) -> bool:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return any(name in ln and "qemu" in ln for ln in ps.splitlines())


def test_kernel_and_rootfs_are_cached(lab):
    s, k, r = lab
    assert k.release == "6.1.0-50-amd64" and k.vmlinuz.is_file()
    assert kernel_mod.fetch_kernel(s, k.release) == k
    again = rootfs_mod.build_rootfs(s, k)
    assert again.path == r.path and again.path.stat().st_mtime == r.path.stat().st_mtime
    assert "kernel/arch/x86/kvm/kvm-amd.ko" in r.modules


def test_unknown_kernel_release_is_one_clear_error(lab):
    s, _k, _r = lab
    with pytest.raises(kernel_mod.KernelError, match="apt has no linux-image-6.1.0-9999-amd64"):
        kernel_mod.fetch_kernel(s, "6.1.0-9999-amd64")


def test_lab_vm_runs_the_kmod_kernel_with_svm_and_loads_kvm_amd(lab, tmp_path):
    s, k, r = lab
    run_id = new_run_id()
    with LabVM.boot(s, k, r, timeout=240, run_id=run_id) as vm:
        assert _qemu_running(vm.name)
        assert vm.run("uname -r", timeout=60).stdout.strip() == k.release
        # the ssh host key was pinned from the console: the VM's own, and ssh refuses another
        pub = vm.run("cut -d' ' -f1,2 /etc/ssh/ssh_host_ed25519_key.pub", timeout=60).stdout
        known = vm.run_dir / "known_hosts"
        pinned = known.read_text()
        assert pinned == f"[127.0.0.1]:{vm.port} {pub.strip()}\n"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(tmp_path / "other")], check=True)
        other = " ".join((tmp_path / "other.pub").read_text().split()[:2])
        known.write_text(f"[127.0.0.1]:{vm.port} {other}\n")
        refused = vm.run("true", timeout=60)
        assert refused.returncode != 0 and "Host key verification failed" in refused.stderr
        known.write_text(pinned)
        assert vm.run("grep -cw svm /proc/cpuinfo", timeout=60).stdout.strip() != "0"
        assert vm.run("python3 -c 'print(6*7)'", timeout=60).stdout.strip() == "42"
        cp = vm.run("modprobe kvm_amd && test -c /dev/kvm && stat -c %t:%T /dev/kvm",
                    timeout=120)
        assert cp.returncode == 0 and cp.stdout.strip() == "a:e8", cp.stderr
        assert "kvm" in vm.dmesg() and (vm.run_dir / "dmesg.txt").is_file() and vm.run("mountpoint -q /sys/kernel/debug",
                                              timeout=30).returncode == 0
        f = tmp_path / "hello.txt"
        f.write_text("hi\n")
        vm.put(f, "/root/in/hello.txt")
        assert vm.run("cat /root/in/hello.txt", timeout=30).stdout == "hi\n"
        import testinfra
        host = testinfra.get_host(vm.host_spec())
        assert host.file("/dev/kvm").exists and host.check_output("uname -r") == k.release
        # `kvmlab verify --hosts` takes the lab VM's host spec as it is
        cp = subprocess.run([sys.executable, "-m", "kvmlab", "verify", "--step", "host",
                             "--hosts", vm.host_spec()], capture_output=True, text=True,
                            timeout=300, env={**os.environ, **s.env()})
        assert "test_dev_kvm_is_the_kvm_char" in cp.stdout, cp.stdout + cp.stderr
        assert "failed" not in cp.stdout and "error" not in cp.stdout, cp.stdout
        assert vm.times.launch_to_sshd > 0 and vm.times.guest_uptime > 0
        assert "ssh -F" in vm.ssh_command() and "root@127.0.0.1" in vm.ssh_command()
        assert (vm.run_dir / "qemu.cmd").read_text().count("127.0.0.1") == 1
        name = vm.name
    assert not _qemu_running(name)


def test_no_svm_is_one_clear_error_and_qemu_is_gone(lab):
    s, k, r = lab
    run_id = new_run_id()
    with pytest.raises(NoSVMError) as ei, LabVM.boot(s, k, r, cpu="qemu64,-svm", timeout=240,
                                                     run_id=run_id):
        pytest.fail("booted without SVM")
    assert "-cpu qemu64,-svm" in ei.value.message and "qemu-system-x86_64" in ei.value.message
    assert "-cpu max" in (ei.value.hint or "")
    assert not _qemu_running(f"kvmlab-labvm-{run_id}")


def test_guest_without_sshd_is_killed_at_the_timeout(lab):
    s, k, _r = lab
    sleeper = rootfs_mod.build_rootfs(
        s, k, init=b"#!/bin/sh\necho 'sleeping, no sshd' > /dev/ttyS0\n"
                   b"while :; do sleep 3600; done\n")
    run_id = new_run_id()
    with pytest.raises(VMError) as ei, LabVM.boot(s, k, sleeper, timeout=25, run_id=run_id):
        pytest.fail("sshd answered")
    assert "did not answer within 25 s" in ei.value.message
    assert "serial.log" in (ei.value.hint or "")
    assert not _qemu_running(f"kvmlab-labvm-{run_id}")


CHILD = """
import sys, time
from kvmlab.core.settings import load_settings
from kvmlab.nested.kernel import Kernel
from kvmlab.nested.rootfs import Rootfs
from kvmlab.nested.labvm import LabVM
from pathlib import Path
s = load_settings({"state_dir": sys.argv[1], "cache": sys.argv[2]})
k = Kernel(sys.argv[3], Path(sys.argv[4]), Path(sys.argv[5]), "")
r = Rootfs(Path(sys.argv[6]), "", "", (), 0)
with LabVM.boot(s, k, r, timeout=240, run_id=sys.argv[7]) as vm:
    print("READY", flush=True)
    time.sleep(600)
"""


def test_sigterm_kills_the_lab_vm(lab):
    s, k, r = lab
    run_id = new_run_id()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(s.state_dir), str(s.cache), k.release, str(k.vmlinuz),
         str(k.modules_dir), str(r.path), run_id], stdout=subprocess.PIPE, text=True,
        env=os.environ.copy())
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "READY"
        assert _qemu_running(f"kvmlab-labvm-{run_id}")
        child.terminate()
        child.wait(timeout=60)
    finally:
        child.kill()
    assert not _qemu_running(f"kvmlab-labvm-{run_id}")
