"""An installed wheel is a whole kvmlab: its checks travel with it.

`pip wheel .`, installed into a fresh venv outside the checkout, fetches a source, verifies the fetch
step with the checks shipped in the package, and runs doctor — with no file of the checkout on
sys.path (the project dir it is given holds only recipes/ and patches/, copied).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from support.fakeqemu import make_fake_qemu_tarball

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _clean_env() -> dict[str, str]:
    """No PYTHONPATH or kvmlab settings of the test run: the venv sees only itself."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("KVMLAB_", "PYTHON", "VIRTUAL_ENV"))}


def _run(cmd, **kw):
    kw.setdefault("env", _clean_env())
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    w = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", root / "dist", REPO],
             timeout=600)
    assert w.returncode == 0, w.stderr[-2000:]
    wheels = list((root / "dist").glob("kvmlab-*.whl"))
    assert len(wheels) == 1
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    i = _run([py, "-m", "pip", "install", "-q", wheels[0]], timeout=900)
    if i.returncode != 0 and "Could not find a version" in i.stderr + i.stdout:
        pytest.skip("the package index is not reachable for the wheel's dependencies")
    assert i.returncode == 0, i.stderr[-3000:]
    return env_dir


def test_installed_wheel_verifies_fetch_and_runs_doctor(wheel_venv, tmp_path):
    home = tmp_path / "project"
    for d in ("recipes", "patches"):
        shutil.copytree(REPO / d, home / d)
    tarball = make_fake_qemu_tarball(tmp_path, name="qemu-kvm-0.12.1.2")
    env = _clean_env()
    env.update(KVMLAB_HOME=str(home), KVMLAB_STATE_DIR=str(tmp_path / "state"),
               KVMLAB_CACHE=str(tmp_path / "cache"), KVMLAB_LOCK=str(tmp_path / "state/kvmlab.lock"),
               NO_COLOR="1", COLUMNS="200")
    kvmlab = wheel_venv / "bin" / "kvmlab"
    where = _run([wheel_venv / "bin" / "python", "-c", "import kvmlab, sys; print(kvmlab.__file__)"],
                 env=env, cwd=tmp_path, timeout=60)
    assert str(wheel_venv) in where.stdout, where.stdout + where.stderr   # not the checkout's
    f = _run([kvmlab, "fetch", "--source", tarball, "--no-verify"], env=env, cwd=tmp_path,
             timeout=300)
    assert f.returncode == 0, f.stdout[-2000:] + f.stderr[-2000:]
    v = _run([kvmlab, "verify", "--step", "fetch"], env=env, cwd=tmp_path, timeout=300)
    assert v.returncode == 0, v.stdout[-3000:] + v.stderr[-2000:]
    assert "test_cached_file_has_the_recorded_sha256" in v.stdout and "passed" in v.stdout
    d = _run([kvmlab, "doctor"], env=env, cwd=tmp_path, timeout=300)
    assert "verdict:" in d.stdout and "Traceback" not in d.stderr, d.stdout[-2000:] + d.stderr


def test_core_install_has_no_ssh_client(wheel_venv):
    """fabric/paramiko come only with the extra kvmlab[hosts]; the core steps above ran without."""
    py = wheel_venv / "bin" / "python"
    r = _run([py, "-c", "import importlib.metadata as m; print('\\n'.join(m.requires('kvmlab')))"],
             timeout=60, cwd="/")
    reqs = r.stdout.splitlines()
    fabric = [q for q in reqs if q.startswith("fabric")]
    assert fabric and all('extra == "hosts"' in q for q in fabric), reqs
    assert any(q.startswith("pytest-testinfra") and "extra" not in q for q in reqs), reqs
    for mod in ("fabric", "paramiko"):
        assert _run([py, "-c", f"import {mod}"], timeout=60, cwd="/").returncode != 0, mod
