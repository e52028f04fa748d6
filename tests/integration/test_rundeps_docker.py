"""Runtime dependencies for real: the fake tree, linked with libpci as well, built in the real
debian12 builder (where libpci-dev is installed), then installed by kvmlab inside a container of
the labhost image, a Debian 12 without libpci3 -- first refused with the apt-get line and
nothing written, then with --install-deps really installed from the Debian mirror (containers
reach it through the default bridge)."""
from __future__ import annotations

import io
import json
import tarfile
import uuid
from pathlib import Path

import pytest

from support.build import docker_available, fake_home

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.docker]
PREFIX = "/opt/kvmlab-rundeps"
APT_LINE = "apt-get install -y --no-install-recommends libpci3"


@pytest.fixture
def target(tmp_path, monkeypatch):
    """(settings, a running labhost container with tmp_path mounted at the same path, the
    kvmlab command to exec there)."""
    reason = docker_available()
    if reason:
        pytest.skip(f"no docker daemon: {reason}")
    from kvmlab.build import qemu as build
    from kvmlab.build.images import docker_client, ensure_image
    from kvmlab.core.settings import load_settings
    from kvmlab.lab import remote
    from kvmlab.model.recipe import load_recipe
    env = fake_home(tmp_path / "home")
    recipe_file = Path(env["KVMLAB_RECIPES_DIR"]) / "fake-qemu.toml"
    text = recipe_file.read_text()
    old = 'configure_add = ["--disable-vnc-tls"]'
    assert old in text
    # the builder's gcc links --as-needed (measured): an unused -lpci alone leaves no DT_NEEDED
    recipe_file.write_text(text.replace(old, 'configure_add = ["--disable-vnc-tls", '
                                             '"--extra-ldflags=-Wl,--no-as-needed -lpci"]', 1))
    env.update({"KVMLAB_STATE_DIR": str(tmp_path / "state"),
                "KVMLAB_CACHE": str(tmp_path / "cache"),
                "KVMLAB_LOCK": str(tmp_path / "state" / "kvmlab.lock")})
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = load_settings()
    res = build.build(s, load_recipe(s.recipes_dir, "fake-qemu"), "debian12", quiet=True)
    pci = {d["soname"]: d for d in res.manifest["runtime_deps"]}["libpci.so.3"]
    assert pci["runtime_package"] == "libpci3" and pci["builder_package"] == "libpci3:amd64"

    bundle = tmp_path / "bundle"
    with tarfile.open(fileobj=io.BytesIO(remote.make_bundle(s)), mode="r:gz") as tar:
        tar.extractall(bundle, filter="data")
    # the bundle carries kvmlab's checks (kvmlab/checks) for `verify`
    client = docker_client()
    img = ensure_image(load_settings({"home": str(REPO)}), "labhost", client=client, quiet=True)
    c = client.containers.run(img.ref, ["sleep", "infinity"], detach=True,
                              name=f"kvmlab-rundeps-{uuid.uuid4().hex[:8]}",
                              volumes={str(tmp_path): {"bind": str(tmp_path), "mode": "rw"}},
                              labels={"io.kvmlab.test": "rundeps"})
    run_env = {**env, "PYTHONPATH": f"{bundle}/lib", "KVMLAB_HOME": str(bundle),
               "TERM": "dumb", "COLUMNS": "300"}
    cmd = ["timeout", "900", "python3", "-m", "kvmlab", "install", "--recipe", "fake-qemu",
           "--builder", "debian12", "--prefix", PREFIX, "--no-verify"]
    try:
        yield s, c, cmd, run_env
    finally:
        c.remove(force=True)
        client.close()


def _exec(c, cmd, env=None):
    rc, (out, err) = c.exec_run(cmd, environment=env, demux=True)
    return rc, (out or b"").decode(errors="replace"), (err or b"").decode(errors="replace")


def test_install_on_a_host_without_libpci_refuses_then_installs_it(target):
    s, c, cmd, env = target
    assert _exec(c, ["dpkg", "-s", "libpci3"])[0] != 0, "the labhost image should lack libpci3"

    rc, out, err = _exec(c, cmd, env)
    assert rc == 1, out + err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines[-2] == ("error: this host lacks 1 shared library that the build of "
                         "fake-qemu/debian12 needs: libpci.so.3 (libpci3); nothing was installed")
    assert lines[-1] == f"hint: `{APT_LINE}` (or run install with --install-deps)"
    assert _exec(c, ["test", "-e", PREFIX])[0] != 0, "refused, yet something was written"
    installs = s.state_dir / "installs"
    assert not installs.exists() or not any(installs.iterdir())
    assert _exec(c, ["dpkg", "-s", "libpci3"])[0] != 0

    rc, out, err = _exec(c, cmd + ["--install-deps"], env)
    assert rc == 0, (out + err)[-3000:]
    assert "installed runtime packages (apt-get): libpci3" in out
    assert "Setting up libpci3" in out, "apt-get's output is streamed"
    log = (s.work_dir / "install-deps.log").read_text()
    assert f"+ {APT_LINE}" in log
    assert _exec(c, ["dpkg", "-s", "libpci3"])[0] == 0
    rc, out, err = _exec(c, [f"{PREFIX}/bin/qemu-system-x86_64", "-version"])
    assert "error while loading shared libraries" not in err
    assert "QEMU PC emulator version 0.12.1" in out, err
    m = json.loads(next(installs.glob("*.json")).read_text())
    assert {Path(e["path"]).name for e in m["files"]} >= {"qemu-system-x86_64", "qemu-img"}

    # now the host has everything: a second run installs no package
    rc, out, err = _exec(c, cmd + ["--install-deps"], env)
    assert rc == 0 and "installed runtime packages" not in out, out + err

    # the library removed behind kvmlab's back: the install check names the package
    assert _exec(c, ["dpkg", "-r", "libpci3"])[0] == 0
    rc, out, err = _exec(c, ["timeout", "300", "python3", "-m", "kvmlab", "verify", "--step",
                             "install"], env)
    assert rc != 0
    flat = " ".join((out + err).split())
    assert "libpci.so.3 (package libpci3)" in flat, out + err
    assert f"fix: {APT_LINE}" in flat
