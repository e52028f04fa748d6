"""make-install mode in the real debian12 builder: the fake tree built by kvmlab.build.qemu, then
its own `make install DESTDIR=...` run in the builder container and copied into place."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from support.build import container_names, docker_available, fake_home
from support.install import tree_state

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.docker]


def test_make_install_in_the_builder(tmp_path, monkeypatch):
    reason = docker_available()
    if reason:
        pytest.skip(f"no docker daemon: {reason}")
    from kvmlab import install as inst
    from kvmlab.build import qemu as build
    from kvmlab.build.images import docker_client
    from kvmlab.core.settings import load_settings
    from kvmlab.model.recipe import load_recipe
    state = tmp_path / "state"
    state.mkdir()
    monkeypatch.setenv("KVMLAB_STATE_DIR", str(state))
    monkeypatch.setenv("KVMLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KVMLAB_LOCK", str(state / "kvmlab.lock"))
    for k, v in fake_home(tmp_path / "home").items():
        monkeypatch.setenv(k, v)
    s = load_settings()
    r = load_recipe(s.recipes_dir, s.recipe)
    build.build(s, r, "debian12", quiet=True)
    dd = tmp_path / "dest"
    before = tree_state(dd)
    client = docker_client()
    containers_before = set(container_names(client))
    res = inst.install(s, r, "debian12", destdir=str(dd), mode="make-install")
    assert set(container_names(client)) == containers_before
    rel = {Path(x.path).relative_to(dd).as_posix(): x for x in res.rows}
    assert "usr/local/bin/qemu-system-x86_64" in rel and "usr/local/share/qemu/bios.bin" in rel
    q = dd / "usr/local/bin/qemu-system-x86_64"
    st = q.stat()
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid()) and st.st_mode & 0o111
    # the tree's make install put the firmware where the binary looks: it starts as is
    p = subprocess.run([str(q), "-S", "-nographic", "-monitor", "stdio"], input="quit\n",
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and "could not load" not in p.stderr
    b = inst.install_bios(s, r, "debian12", destdir=str(dd))
    assert b.proof.ok and b.noop
    assert not list((state / "tmp").glob("make-install-*"))
    inst.uninstall(s, destdir=str(dd))
    assert tree_state(dd) == before
