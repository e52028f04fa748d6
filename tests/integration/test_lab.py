"""invoke lab end to end on this machine: fake qemu-like source, real dockerd + debian12 builder,
real install into a temp prefix, real boot of the tiny guest with the distribution's qemu (the fake
binary cannot boot anything), lock file, --check, verify, repro-check."""
from __future__ import annotations

import json

import pytest

from kvmlab.qemu.binary import distro_qemu
from support.fakeqemu import make_fake_home, make_fake_qemu_tarball

pytestmark = [pytest.mark.slow, pytest.mark.docker]

# Debian's qemu-system-x86_64 as dpkg installed it: PATH's first hit is whatever the last
# `invoke lab` put into /usr/local/bin (qemu-kvm 0.12, which these tests must not depend on)
_Q = distro_qemu()
DISTRO_QEMU = str(_Q) if _Q else None


def _docker_up() -> bool:
    try:
        from kvmlab.build.images import docker_client
        docker_client()
        return True
    except Exception as e:  # pragma: no cover - depends on the machine
        print(f"docker unavailable: {e}")
        return False


@pytest.fixture
def lab_env(kvmlab_env, tmp_path, monkeypatch):
    if not _docker_up():
        pytest.skip("dockerd is not running (CI starts it in .ci/setup)")
    if not DISTRO_QEMU:
        pytest.skip("Debian's qemu-system-x86 is not installed (CI installs it)")
    tarball = make_fake_qemu_tarball(tmp_path / "dist")
    env = make_fake_home(tmp_path / "home", tarball=tarball)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    prefix = tmp_path / "prefix"
    return {"prefix": str(prefix), "state": kvmlab_env.state_dir, "tmp": tmp_path}


def lab_args(e, *extra):
    return ("lab", "--builder", "debian12", "--prefix", e["prefix"], "--qemu", DISTRO_QEMU,
            "--guest", "tiny", *extra)


def test_lab_end_to_end_then_noop_check_and_corruption(lab_env, cli):
    r = cli(*lab_args(lab_env, "--report"), timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # --report: the page of this run, its checks (run in the same process after the plotting
    # library was found) all passed or skipped
    page = (lab_env["state"] / "report" / "lab-report.html").read_text()
    assert "lab passed" in page and "<svg" in page and ">build<" in page
    assert "</b> failed" in page and "<b>0</b> failed" in page
    lock = json.loads((lab_env["state"] / "lab.lock.json").read_text())
    assert lock["recipe"]["name"] == "fake-qemu"
    assert len(lock["source"]["sha256"]) == 64
    assert lock["boot"]["booted"] is True and lock["boot"]["accel"] in ("tcg", "kvm")
    bios = [p for p in lock["installed"] if p.endswith("/bios.bin")]
    assert bios, lock["installed"]
    # data directories (keymaps, needed by -vnc / -k) land next to the firmware
    assert any(p.endswith("/keymaps/en-us") for p in lock["installed"]), lock["installed"]
    assert lock["build"]["artifacts"]["bin/qemu-system-x86_64"]

    # verify: every step's testinfra checks against this host
    v = cli("verify", "--step", "all", "--builder", "debian12")
    assert v.returncode == 0, v.stdout[-3000:] + v.stderr[-2000:]

    # second run: every step is a no-op (or skipped)
    r2 = cli(*lab_args(lab_env, "--no-verify"))
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-2000:]
    state = json.loads((lab_env["state"] / "lab" / "state.json").read_text())
    assert state["failed"] is None
    for line in r2.stdout.splitlines():
        for step in ("fetch", "patch", "images", "build", "install", "doctor", "boot-test"):
            if line.split()[:1] == [step]:     # piped: the summary is plain lines
                assert "no-op" in line or "skipped" in line, line

    ok = cli("lab", "--check", "--builder", "debian12")
    assert ok.returncode == 0, ok.stdout + ok.stderr

    # corrupt the installed bios.bin: --check fails and names the file
    with open(bios[0], "r+b") as f:
        f.write(b"\0corrupt")
    bad = cli("lab", "--check", "--builder", "debian12")
    assert bad.returncode != 0
    assert "bios.bin" in bad.stdout + bad.stderr
    assert "Traceback" not in bad.stderr


def test_lab_stops_at_failing_step_and_resumes(lab_env, cli, tmp_path):
    # a file where install needs PREFIX/bin: install fails with one clear error; nothing after
    # it runs (a --prefix that is itself a file is refused before the lab starts)
    blocker = tmp_path / "pfx" / "bin"
    blocker.parent.mkdir()
    blocker.write_text("in the way")
    e = dict(lab_env, prefix=str(blocker.parent))
    r = cli(*lab_args(e, "--report"), timeout=1500)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "lab stopped at install" in r.stderr
    page = (lab_env["state"] / "report" / "lab-report.html").read_text()   # --report: also now
    assert "lab FAILED at step install" in page
    state = json.loads((lab_env["state"] / "lab" / "state.json").read_text())
    assert state["failed"] == "install" and "build" in state["done"]
    blocker.unlink()
    r2 = cli(*lab_args(e, "--resume"), timeout=600)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-2000:]
    assert "done before --resume" in r2.stdout


def test_repro_check_fake_tree(lab_env, cli):
    r = cli("repro-check", "--builder", "debian12", timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "bit-identical" in r.stdout
