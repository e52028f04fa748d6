"""Multi-host lab: three lab hosts as containers running sshd, published on 127.0.0.1 only.
The build runs once on the controller; the host-side steps run on every host in parallel; one host
made unreachable is reported while the others complete."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from support.fakeqemu import make_fake_home, make_fake_qemu_tarball
from support.labhosts import lab_hosts

pytestmark = [pytest.mark.slow, pytest.mark.docker]


@pytest.fixture
def hosts3(kvmlab_env, tmp_path):
    pytest.importorskip("fabric", reason="the [hosts] extra is not installed")
    from kvmlab.build.images import docker_client
    from kvmlab.core.errors import DockerError
    try:
        docker_client()
    except DockerError as e:
        pytest.skip(f"dockerd is not running: {e.message}")
    with lab_hosts(kvmlab_env, 3, tmp_path) as h:
        yield h


def test_lab_on_three_hosts_one_unreachable(hosts3, kvmlab_env, tmp_path, monkeypatch):
    tarball = make_fake_qemu_tarball(tmp_path / "dist")
    for k, v in make_fake_home(tmp_path / "home", tarball=tarball).items():
        monkeypatch.setenv(k, v)
    inv = hosts3.inventory(tmp_path / "hosts.txt")
    import os
    import sys
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        # fresh containers: their keys are new to kvmlab's known_hosts, accepted as ssh's
        # accept-new would (tests/integration/test_hosts_inventory.py: refused without it)
        [sys.executable, "-m", "invoke", "lab", "--hosts", str(inv), "--builder", "debian12",
         "--prefix", "/opt/kvmlab", "--skip", "create-image,guest,boot-test",
         "--accept-new-host-keys"],
        cwd=repo, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the third host goes away while the run is under way (the controller is still building)
    dead = hosts3.containers[2]
    dead.kill()
    out, err = proc.communicate(timeout=1500)
    text = out + err
    assert proc.returncode != 0, text[-3000:]
    assert "Traceback" not in err
    assert "1 of 3 host(s) failed" in text, text[-3000:]
    assert f"127.0.0.1:{hosts3.ports[2]}" in text
    for port in hosts3.ports[:2]:
        lock = kvmlab_env.state_dir / "lab" / "hosts" / f"127.0.0.1_{port}.lock.json"
        assert lock.exists(), text[-3000:]
    # the surviving hosts really have the installed binary and firmware
    for c in hosts3.containers[:2]:
        r = c.exec_run(["/opt/kvmlab/bin/qemu-system-x86_64", "-version"])
        assert r.exit_code == 0 and b"0.12.1" in r.output
        r = c.exec_run(["ls", "/opt/kvmlab/share/qemu/bios.bin", "/opt/kvmlab/share/qemu/vapic.bin"])
        assert r.exit_code == 0, r.output
