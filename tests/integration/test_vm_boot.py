"""Real boots with the distribution's qemu (qemu-system-x86 from Debian, installed by .ci/setup).

"The distribution's qemu" is the file the Debian package installed (dpkg says which), not PATH's
first qemu-system-x86_64: after `invoke lab` that is the qemu-kvm 0.12 build in /usr/local/bin.
Tests that need a 0.12 build take it from the ``qemu_012`` fixture (tests/conftest.py).

Everything runs under the real host's conditions: the KVM expectations are derived from
kvmlab.host.doctor.probe_kvm()'s real answer, never assumed.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmlab.boot import guest as guest_mod
from kvmlab.boot import iso as iso_mod
from kvmlab.boot import kernel as kernel_mod
from kvmlab.boot import vm
from kvmlab.core.errors import VMError
from kvmlab.qemu import binary

_DISTRO_QEMU = binary.distro_qemu()
QEMU = str(_DISTRO_QEMU) if _DISTRO_QEMU else None
QEMU_IMG = binary.distro_qemu_img()
pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(QEMU is None or QEMU_IMG is None,
                                 reason="Debian's qemu-system-x86 / qemu-utils not installed "
                                 "(apt-get install qemu-system-x86 qemu-utils; .ci/setup does)")]
REPO = Path(__file__).resolve().parents[2]

SLEEPING_INIT = """#!/bin/sh
export PATH=/bin
echo "kvmlab-test: init is sleeping instead of printing the marker"
sleep 100000
"""


def qemu_processes(needle: str) -> list[str]:
    """Command lines of running processes that mention needle (a run name or state dir)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        cmd = b" ".join(argv).decode(errors="replace")
        if needle in cmd and os.path.basename(argv[0]).startswith(b"qemu-system"):
            found.append(f"{pid}: {cmd}")
    return found


def assert_booted(r: vm.BootResult, accel: str = "tcg") -> None:
    assert r.booted, f"{r.failure}\n{r.serial_tail()}"
    assert r.accel == accel
    assert r.marker in r.serial_log.read_text(errors="replace")
    assert r.seconds is not None and 0 < r.seconds <= r.wall_seconds
    assert not qemu_processes(r.name)


def test_tiny_guest_boots_under_tcg(kvmlab_env):
    r = vm.boot_test(kvmlab_env, qemu=QEMU, accel="tcg", guest="tiny")
    assert_booted(r)
    assert r.powered_off, "the boot sector powers the machine off: qemu must exit by itself"
    assert "-S" in r.command and any("serial.log" in a for a in r.command)
    # a second run gets a different nonce: the marker proves *this* run booted
    r2 = vm.boot_test(kvmlab_env, qemu=QEMU, accel="tcg", guest="tiny")
    assert r2.marker != r.marker and r.marker not in r2.serial_log.read_text(errors="replace")


@pytest.mark.slow
def test_linux_guest_boots_under_tcg_and_reports_facts(kvmlab_env):
    r = vm.boot_test(kvmlab_env, qemu=QEMU, accel="tcg", guest="linux")
    assert_booted(r)
    assert r.facts["hypervisor"] in ("yes", "no")
    assert r.facts["cpus"] == "1" and int(r.facts["mem_kb"]) > 100_000
    assert r.facts["kernel"] in kernel_mod.find_kernel().name
    assert r.facts["clocksource"] != "kvm-clock", "TCG guest cannot have kvm-clock"
    assert r.disk and r.disk_format == "qcow2" and r.disk_size == 1 << 30


@pytest.mark.slow
def test_iso_guest_boots_from_cdrom(kvmlab_env):
    r = vm.boot_test(kvmlab_env, qemu=QEMU, accel="tcg", guest="iso")
    assert_booted(r)
    assert "-boot" in r.command and r.command[r.command.index("-boot") + 1] == "d"
    assert any("media=cdrom" in a for a in r.command)
    # the same ISO as a user's installer ISO: passes by the boot-loader check, not the marker
    iso = guest_mod.make_iso(kvmlab_env).iso
    et = iso_mod.read_el_torito(iso)
    assert et.load_address == 0x7C00
    u = vm.boot_test(kvmlab_env, qemu=QEMU, accel="tcg", iso=iso, timeout=60)
    assert u.booted and u.guest == "user-iso", u.failure
    assert u.evidence
    assert not qemu_processes(u.name)


@pytest.mark.slow
def test_guest_without_marker_times_out_and_is_killed(kvmlab_env, cli, tmp_path):
    init = tmp_path / "init"
    init.write_text(SLEEPING_INIT)
    p = cli("boot-test", "--qemu", QEMU, "--accel", "tcg", "--guest", "linux", "--init", str(init),
            "--timeout", "15", "--no-verify", timeout=300)
    assert p.returncode != 0, p.stdout + p.stderr
    assert "did not boot" in p.stderr and "timeout" in p.stderr
    last = json.loads((kvmlab_env.state_dir / "vm" / "last-boot.json").read_text())[0]
    assert last["booted"] is False
    assert not qemu_processes(last["name"]), "the VM must be killed"
    assert not qemu_processes(str(kvmlab_env.state_dir))
    log = Path(last["serial_log"]).read_text(errors="replace")
    assert last["marker"] not in log
    # the serial log is kept and its tail shown
    if "init is sleeping" in log:
        assert "init is sleeping" in p.stdout


def test_tiny_boot_test_cli_with_checks(kvmlab_env, cli):
    p = cli("boot-test", "--qemu", QEMU, "--accel", "tcg", "--guest", "tiny", timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "tiny" in p.stdout and "tcg" in p.stdout and "verified boot" in p.stdout
    assert not qemu_processes(str(kvmlab_env.state_dir))


def test_dry_run_prints_command_and_starts_nothing(kvmlab_env, cli):
    assert cli("guest", "--kind", "tiny").returncode == 0
    p = cli("boot-test", "--qemu", QEMU, "--accel", "tcg", "--guest", "tiny", "--dry-run")
    assert p.returncode == 0, p.stderr
    line = p.stdout.strip().splitlines()[-1]
    # a command to paste: serial console on the terminal, not paused, no socket or run dir
    assert line.startswith(QEMU) and "-serial stdio" in line and "-no-reboot" in line
    assert " -S" not in line and "snapshot=on" in line
    assert not (kvmlab_env.state_dir / "vm").exists()


def test_existing_image_refused_without_force(kvmlab_env, cli, tmp_path):
    img = tmp_path / "vm.img"
    img.write_bytes(b"precious data")
    before = img.stat().st_mtime_ns
    p = cli("create-image", str(img), "--size", "1G", "--qemu-img", str(QEMU_IMG), "--no-verify")
    assert p.returncode == 1 and "already exists" in p.stderr and "--force" in p.stderr
    assert img.read_bytes() == b"precious data" and img.stat().st_mtime_ns == before
    p = cli("create-image", str(img), "--size", "1G", "--qemu-img", str(QEMU_IMG), "--force")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "verified boot" in p.stdout
    info = json.loads(subprocess.run([str(QEMU_IMG), "info", "--output=json", str(img)],
                                     capture_output=True, text=True, check=True,
                                     timeout=60).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == 1 << 30
    assert not [f for f in tmp_path.iterdir() if "kvmlab-tmp" in f.name]


# What PATH's first qemu-img says when it cannot read the image it is asked about: qemu-kvm
# 0.12's qemu-img probes a qcow2 v3 image as raw (and has no --output=json).
WRONG_QEMU_IMG = """#!/bin/sh
echo "image: $3"
echo "file format: raw"
echo "virtual size: 512 (512 bytes)"
"""


def _path_with_wrong_qemu_img(tmp_path: Path) -> dict[str, str]:
    d = tmp_path / "path-first"
    d.mkdir()
    (d / "qemu-img").write_text(WRONG_QEMU_IMG)
    (d / "qemu-img").chmod(0o755)
    return {"PATH": f"{d}:{os.environ.get('PATH', '')}"}


def test_checks_read_the_image_with_the_recorded_qemu_img_not_path(kvmlab_env, cli, tmp_path):
    """create-image and boot-test record which qemu-img made / read the disk; their checks use
    it, so a different qemu-img first on PATH changes nothing."""
    env = _path_with_wrong_qemu_img(tmp_path)
    img = tmp_path / "disk.qcow2"
    p = cli("create-image", str(img), "--size", "64M", "--qemu-img", str(QEMU_IMG), env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "verified boot" in p.stdout and "failed" not in p.stdout
    p = cli("boot-test", "--qemu", QEMU, "--accel", "tcg", "--guest", "tiny", "--disk", str(img),
            env=env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "verified boot" in p.stdout and "failed" not in p.stdout
    last = json.loads((kvmlab_env.state_dir / "vm" / "last-boot.json").read_text())[0]
    assert last["disk"] == str(img) and last["disk_qemu_img"] == str(QEMU_IMG)
    # the check really reads the disk: the same record with PATH's qemu-img named in it fails
    last["disk_qemu_img"] = str(tmp_path / "path-first" / "qemu-img")
    bad = tmp_path / "bad-record.json"
    bad.write_text(json.dumps([last]))
    v = cli("verify", "--step", "boot", env={**env, "KVMLAB_VERIFY_RESULTS": str(bad)})
    assert v.returncode != 0 and "test_disk_image_valid" in v.stdout, v.stdout + v.stderr


def test_missing_or_non_qemu_binary_is_a_clear_error(kvmlab_env, cli, tmp_path):
    p = cli("boot-test", "--qemu", str(tmp_path / "no-such-qemu"), "--guest", "tiny")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "--qemu: " in p.stderr and "no-such-qemu: no such file" in p.stderr
    p = cli("boot-test", "--qemu", "/bin/true", "--guest", "tiny")
    assert p.returncode == 1 and "not a qemu system emulator" in p.stderr
    assert "Traceback" not in p.stderr


def test_accel_follows_the_real_kvm_probe(kvmlab_env):
    from kvmlab.host.doctor import probe_kvm
    probe = probe_kvm()
    r = vm.boot_test(kvmlab_env, qemu=QEMU, accel="auto", guest="tiny")
    if probe.usable:
        assert_booted(r, "kvm")
    else:
        assert_booted(r, "tcg")
        assert "TCG" in r.accel_reason and probe.verdict in r.accel_reason
    if probe.usable:
        assert_booted(vm.boot_test(kvmlab_env, qemu=QEMU, accel="kvm", guest="tiny"), "kvm")
    elif os.path.exists("/dev/kvm"):
        with pytest.raises(VMError, match="KVM"):
            vm.boot_test(kvmlab_env, qemu=QEMU, accel="kvm", guest="tiny", timeout=20)
        assert not qemu_processes(str(kvmlab_env.state_dir))


def test_auto_says_which_accelerator_on_the_command_line(kvmlab_env, cli):
    from kvmlab.host.doctor import probe_kvm
    probe = probe_kvm()
    p = cli("boot-test", "--qemu", QEMU, "--guest", "tiny", "--no-verify")
    assert p.returncode == 0, p.stdout + p.stderr
    want = "kvm" if probe.usable else "tcg"
    assert f"accelerator: {want}" in p.stdout
    if not probe.usable:
        assert "using TCG" in p.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_kills_the_vm(kvmlab_env, tmp_path, sig):
    init = tmp_path / "init"
    init.write_text(SLEEPING_INIT)
    env = {**os.environ}
    proc = subprocess.Popen([sys.executable, "-m", "invoke", "boot-test", "--qemu", QEMU,
                             "--accel", "tcg", "--guest", "linux", "--init", str(init),
                             "--timeout", "300", "--no-verify"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not qemu_processes(str(kvmlab_env.state_dir)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "qemu never started"
            time.sleep(0.05)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert "interrupted" in err
    assert not qemu_processes(str(kvmlab_env.state_dir)), "the VM must die with the tool"


ISOLINUX = Path("/usr/lib/ISOLINUX/isolinux.bin")
SYSLINUX_MODULES = Path("/usr/lib/syslinux/modules/bios")


@pytest.mark.skipif(not (ISOLINUX.exists() and shutil.which("xorriso")),
                    reason="isolinux / xorriso not installed (apt-get install isolinux "
                           "syslinux-common xorriso; .ci/setup does)")
def test_user_iso_with_graphical_isolinux_menu(kvmlab_env, cli, tmp_path):
    """A CentOS-style installer ISO (isolinux + vesamenu, nothing on serial) reaches its menu."""
    root = tmp_path / "root" / "isolinux"
    root.mkdir(parents=True)
    shutil.copy(ISOLINUX, root)
    for m in ("ldlinux.c32", "vesamenu.c32", "libcom32.c32", "libutil.c32"):
        shutil.copy(SYSLINUX_MODULES / m, root)
    (root / "isolinux.cfg").write_text("default vesamenu.c32\ntimeout 600\n"
                                       "menu title test installer\nlabel linux\n  kernel vmlinuz\n")
    iso = tmp_path / "installer.iso"
    subprocess.run(["xorriso", "-as", "mkisofs", "-o", str(iso), "-b", "isolinux/isolinux.bin",
                    "-c", "isolinux/boot.cat", "-no-emul-boot", "-boot-load-size", "4",
                    "-boot-info-table", str(tmp_path / "root")],
                   check=True, capture_output=True, timeout=120)
    p = cli("boot-test", "--qemu", QEMU, "--accel", "tcg", "--iso", str(iso), "--timeout", "60",
            timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "verified boot" in p.stdout
    last = json.loads((kvmlab_env.state_dir / "vm" / "last-boot.json").read_text())[0]
    assert last["booted"] and last["guest"] == "user-iso"
    assert last["evidence"].startswith("El Torito boot image")  # vesamenu prints nothing on serial
    assert not qemu_processes(last["name"])
    # a data ISO without a boot record: refused before qemu starts
    plain = tmp_path / "plain.iso"
    subprocess.run(["xorriso", "-as", "mkisofs", "-o", str(plain), str(tmp_path / "root")],
                   check=True, capture_output=True, timeout=120)
    p = cli("boot-test", "--qemu", QEMU, "--accel", "tcg", "--iso", str(plain))
    assert p.returncode == 1 and "not a BIOS-bootable CD image" in p.stderr


@pytest.mark.slow
@pytest.mark.docker
def test_tiny_and_linux_boot_with_qemu_kvm_012(kvmlab_env, qemu_012):
    r = vm.boot_test(kvmlab_env, qemu=qemu_012.qemu, accel="tcg", guest="tiny")
    assert_booted(r)
    assert "-no-kvm" in r.command and "-nographic" in r.command
    assert r.qemu_version.startswith("0.12")
    r = vm.boot_test(kvmlab_env, qemu=qemu_012.qemu, accel="tcg", guest="linux")
    assert_booted(r)
    assert r.disk_format == "qcow2"  # made with compat=0.10 when a newer qemu-img made it
    assert r.disk_qemu_img == str(qemu_012.qemu_img)  # the build's own, next to its qemu


@pytest.mark.slow
@pytest.mark.docker
def test_create_image_and_boot_test_checks_pass_with_qemu_kvm_012_tools(kvmlab_env, cli,
                                                                         qemu_012, tmp_path):
    """The issue-12 case: 0.12's qemu-img (no --output=json) made the image; its checks pass."""
    img = tmp_path / "012.qcow2"
    p = cli("create-image", str(img), "--size", "256M", "--qemu-img", str(qemu_012.qemu_img))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "verified boot" in p.stdout and "failed" not in p.stdout
    p = cli("boot-test", "--qemu", str(qemu_012.qemu), "--accel", "tcg", "--guest", "tiny",
            "--disk", str(img), timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "verified boot" in p.stdout and "failed" not in p.stdout
    last = json.loads((kvmlab_env.state_dir / "vm" / "last-boot.json").read_text())[0]
    assert last["qemu_version"].startswith("0.12") and last["disk_format"] == "qcow2"
