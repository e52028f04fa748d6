"""Integration: the fake qemu-like tree through fetch (file:// URL) -> patch -> build in the real
debian12 builder with the real dockerd; no-op rebuilds, verify, clean, native builds and the
failure paths (no daemon, image missing, compile error, SIGTERM/Ctrl-C during a build)."""
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

from support.build import (
    build_containers,
    compile_error_patch,
    docker_available,
    fake_home,
    version_patch,
)

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.docker]


@pytest.fixture(scope="session")
def docker_client():
    reason = docker_available()
    if reason:
        pytest.skip(f"no docker daemon: {reason}")
    from kvmlab.build.images import docker_client as dc
    c = dc()
    yield c
    c.close()


@pytest.fixture(scope="session")
def debian12_image(docker_client, tmp_path_factory):
    """The real builder image, built once per session (cached by its inputs tag across runs)."""
    from kvmlab.build.images import ensure_image
    from kvmlab.core.settings import load_settings
    state = tmp_path_factory.mktemp("images-state")
    s = load_settings({"home": str(REPO), "state_dir": str(state),
                       "cache": str(state / "cache")})
    return ensure_image(s, "debian12", client=docker_client, quiet=True)


@pytest.fixture
def fake_env(kvmlab_env, tmp_path, monkeypatch):
    """Settings for the fake recipe (patched KVM_VERSION), with KVMLAB_* set for CLI runs."""
    def make(**kw):
        from kvmlab.core.settings import load_settings
        env = fake_home(tmp_path / "home", **kw)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("KVMLAB_BUILDER", "debian12")
        return load_settings()
    return make


def _recipe(s):
    from kvmlab.model.recipe import load_recipe
    return load_recipe(s.recipes_dir, s.recipe)


def test_fake_tree_builds_in_debian12_and_rebuild_is_a_noop(fake_env, debian12_image,
                                                             docker_client, monkeypatch):
    from kvmlab.build import qemu as build
    from kvmlab.lab import verify
    s = fake_env(patches={"0001-version.patch": version_patch()})
    r = build.build(s, _recipe(s), "debian12", quiet=True)
    assert not r.noop
    out = s.out("fake-qemu", "debian12")
    assert r.out_dir == out
    m = json.loads((out / "manifest.json").read_text())
    assert m == r.manifest
    assert m["image_id"] == debian12_image.id
    assert m["patches"][0]["name"] == "0001-version.patch"
    assert m["compiler"].startswith("cc (Debian 12")
    assert m["config"] == {"prefix": "/usr/local", "datadir": "/usr/local/share/qemu"}
    assert Path(m["build_dir"]).is_dir()
    # the patch reached the binary, and outputs belong to the invoking user
    v = subprocess.run([out / "bin" / "qemu-system-x86_64", "-version"], capture_output=True,
                       text=True, timeout=30)
    assert "qemu-kvm-0.12.1.2-fake-patched" in v.stdout
    for p in [*(out / "bin").iterdir(), Path(m["build_dir"]) / "qemu-img"]:
        assert p.stat().st_uid == os.getuid()
    assert (out / "pc-bios" / "bios.bin").is_file()
    # runtime dependencies, found in the builder where the binaries were linked
    deps = {d["soname"]: d for d in m["runtime_deps"]}
    z = deps["libz.so.1"]
    assert z["needed_by"] == ["bin/qemu-system-x86_64"], "only the emulator links zlib"
    assert z["builder_package"] == "zlib1g:amd64" and z["runtime_package"] == "zlib1g"
    assert z["builder_path"].endswith("/x86_64-linux-gnu/libz.so.1")
    assert deps["libc.so.6"]["runtime_package"] == "libc6"
    assert set(deps["libc.so.6"]["needed_by"]) == {f"bin/{n}" for n in
                                                   ("qemu-system-x86_64", "qemu-img", "qemu-io",
                                                    "qemu-nbd")}
    assert "deps" in m["timings"]
    assert not build_containers(docker_client, "fake-qemu"), "build container left behind"
    log = Path(m["log"]).read_text()
    assert "+ make -j2" in log and "x86_64-softmmu/qemu-system-x86_64" in log

    report = verify.run_checks(s, ["build"])
    assert report.ok, [(x.name, x.message) for x in report.failed()]

    # identical inputs: a no-op that does not even need the daemon
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    again = build.build(s, _recipe(s), "debian12", quiet=True)
    assert again.noop and again.manifest == m
    monkeypatch.delenv("DOCKER_HOST")

    # a damaged artifact is noticed by the checks and by the no-op test
    (out / "bin" / "qemu-img").write_bytes(b"broken")
    assert not verify.run_checks(s, ["build"]).ok
    fixed = build.build(s, _recipe(s), "debian12", quiet=True)
    assert not fixed.noop
    assert verify.run_checks(s, ["build"]).ok


def test_cli_build_verify_and_clean(fake_env, debian12_image, cli):
    s = fake_env()
    r = cli("build", "--jobs", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verified build" in r.stdout
    out = s.out("fake-qemu", "debian12")
    assert (out / "manifest.json").is_file()
    r2 = cli("build")
    assert r2.returncode == 0 and "no-op" in r2.stdout and str(out) in r2.stdout.replace("\n", "")
    r3 = cli("clean")
    assert r3.returncode == 0, r3.stderr
    assert not out.exists() and not (s.work("fake-qemu") / "build-debian12").exists()
    assert (s.work("fake-qemu") / "src").is_dir(), "clean keeps the prepared source"
    assert any(s.sources_cache.rglob("*.tar.gz")), "clean keeps the download cache"


def test_native_builder_builds_on_the_host(fake_env):
    if not shutil.which("cc") or not shutil.which("make"):
        pytest.skip("no host compiler (cc/make)")
    from kvmlab.build import qemu as build
    s = fake_env()
    r = build.build(s, _recipe(s), "native", quiet=True)
    assert r.manifest["image_id"] is None and r.manifest["compiler"]
    v = subprocess.run([r.out_dir / "bin" / "qemu-img", "--version"], capture_output=True,
                       text=True, timeout=30)
    assert v.returncode == 0 and "qemu-img version 0.12.1" in v.stdout


def test_daemon_not_running_is_one_clear_line(fake_env, cli, monkeypatch):
    fake_env()
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    r = cli("build")
    assert r.returncode == 1
    err = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert err[0] == ("error: docker daemon is not running / not reachable at "
                      "unix:///nonexistent/docker.sock")
    assert err[1].startswith("hint:") and "dockerd" in err[1]
    assert len(err) == 2, err
    assert "Traceback" not in r.stderr


def test_missing_image_offline_hints_invoke_images(fake_env, cli, tmp_path, monkeypatch,
                                                   docker_client):
    fake_env()
    # a builder context nobody has built: its tag cannot exist
    home = tmp_path / "altered-home"
    shutil.copytree(REPO / "docker", home / "docker")
    with open(home / "docker" / "debian12" / "Dockerfile", "a") as f:
        f.write(f"# altered by the tests {time.time()}\n")
    monkeypatch.setenv("KVMLAB_HOME", str(home))
    # fetch once (online), then build offline
    assert cli("fetch", "--no-verify").returncode == 0
    r = cli("build", "--offline")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "builder image kvmlab/debian12:" in r.stderr and "is missing" in r.stderr
    assert "invoke images --builder debian12" in r.stderr
    assert "Traceback" not in r.stderr


def test_centos6_without_base_explains_the_two_ways_out(kvmlab_env, docker_client, cli):
    from kvmlab.build.images import find_image
    if find_image(docker_client, "centos:6") is not None:
        pytest.skip("a centos:6 image is present: the missing-base path cannot be shown")
    r = cli("images", "--builder", "centos6")
    assert r.returncode == 1
    assert "base image centos:6 for builder 'centos6' is not available locally" in r.stderr
    assert "docker load -i centos6.tar" in r.stderr and "--builder debian12" in r.stderr


def test_centos6_image_builds_from_a_local_base(kvmlab_env, docker_client):
    """Only with a real CentOS 6 image loaded (`docker load -i centos6.tar`); no stand-in."""
    from kvmlab.build.images import ensure_image, find_image
    if find_image(docker_client, "centos:6") is None:
        pytest.skip("no local centos:6 image (no registry here; `docker load -i centos6.tar` "
                    "to run this test)")
    info = ensure_image(kvmlab_env, "centos6", client=docker_client, quiet=True)
    out = docker_client.containers.run(info.ref, ["sh", "-c", "gcc --version; ccache -V"],
                                       remove=True).decode()
    assert "gcc (GCC) 4.4" in out and "ccache version" in out


def test_compile_error_shows_log_tail_and_leaves_nothing(fake_env, debian12_image, cli,
                                                         docker_client):
    s = fake_env(patches={"0001-break.patch": compile_error_patch()})
    r = cli("build")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "kvmlab-test-compile-error" in r.stderr, "log tail not shown"
    log = s.work("fake-qemu") / "build-debian12.log"
    assert f"full log: {log}" in r.stderr.replace("\n", "")
    assert "build of fake-qemu with debian12 failed (exit 2)" in r.stderr
    assert "kvmlab-test-compile-error" in log.read_text()
    assert not s.out("fake-qemu", "debian12").exists()
    assert not build_containers(docker_client, "fake-qemu")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_build_removes_container_and_writes_no_out(fake_env, debian12_image,
                                                                 docker_client, sig):
    s = fake_env(make=["sh", "-c", "echo kvmlab-build-started; sleep 300"])
    p = subprocess.Popen([sys.executable, "-m", "invoke", "build"], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    name = f"kvmlab-build-fake-qemu-debian12-{p.pid}"
    log = s.work("fake-qemu") / "build-debian12.log"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None:
            if log.is_file() and "kvmlab-build-started" in log.read_text():
                break
            time.sleep(0.2)
        assert p.poll() is None, p.communicate()
        assert build_containers(docker_client, name), "the build container is not running"
        p.send_signal(sig)
        t0 = time.monotonic()
        _, err = p.communicate(timeout=30)
        gone = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err
    assert "interrupted" in err
    assert not build_containers(docker_client, name), "container left behind"
    assert gone < 20
    assert not s.out("fake-qemu", "debian12").exists()
    assert not [x for x in s.out_dir.rglob("*") if ".tmp" in x.name]


def test_images_task_is_a_noop_for_an_existing_image(debian12_image, kvmlab_env, cli):
    r = cli("images", "--builder", "debian12")
    assert r.returncode == 0, r.stdout + r.stderr
    assert debian12_image.ref in r.stdout.replace("\n", "") or debian12_image.tag in r.stdout
    assert "no-op" in r.stdout


@pytest.mark.parametrize("builder", ["debian12", "native"])
def test_a_hung_build_times_out_and_is_stopped(fake_env, cli, monkeypatch, docker_client, builder):
    s = fake_env(make=["sh", "-c", "echo kvmlab-hung-build; sleep 300"])
    monkeypatch.setenv("KVMLAB_BUILD_TIMEOUT", "5")
    t0 = time.monotonic()
    r = cli("build", "--builder", builder, timeout=120)
    assert time.monotonic() - t0 < 60
    assert r.returncode == 1, r.stdout + r.stderr
    assert "build timed out after 5 s and was stopped" in r.stderr
    assert not s.out("fake-qemu", builder).exists()
    assert not build_containers(docker_client, "fake-qemu")
    left = subprocess.run(["pgrep", "-f", "kvmlab-hung-build"], capture_output=True, text=True)
    assert left.stdout.strip() == "", "the native build's processes were not stopped"


def test_base_image_is_the_hosts_mirror_trimmed(debian12_image, docker_client, kvmlab_env):
    from kvmlab.build import images
    base = images.ensure_base_image(kvmlab_env, "debian12", client=docker_client)
    assert base.noop and base.ref == images.base_ref("debian12")
    mirror = images.debian_mirror().uri
    out = docker_client.containers.run(
        base.ref, ["sh", "-c", "cat /etc/apt/sources.list; echo LISTS; ls /var/lib/apt/lists; "
                   "echo DEBS; ls /var/cache/apt/archives; . /etc/os-release; echo $VERSION_CODENAME"],
        remove=True, network_mode="none").decode()
    sources, rest = out.split("LISTS\n")
    assert [ln for ln in sources.splitlines() if ln.strip()] == [f"deb {mirror} bookworm main"]
    lists, rest = rest.split("DEBS\n")
    assert set(lists.split()) <= {"lock", "partial", "auxfiles"}
    assert not [x for x in rest.split() if x.endswith(".deb")]
    assert rest.split()[-1] == "bookworm"
    again = images.ensure_image(kvmlab_env, "debian12", client=docker_client)
    assert again.noop and again.id == debian12_image.id


def test_recipe_builder_image_selects_the_docker_dir(fake_env, monkeypatch):
    """builders.<name>.image picks docker/<image>/ (e.g. the el6 recipe's debian12-el6)."""
    from kvmlab.build import qemu as build
    from kvmlab.core.errors import DockerError
    s = fake_env()
    p = s.recipes_dir / "fake-qemu.toml"
    p.write_text(p.read_text().replace('[builders.debian12]\n',
                                       '[builders.debian12]\nimage = "no-such-image-dir"\n', 1))
    with pytest.raises(DockerError) as e:
        build.build(s, _recipe(s), "debian12", quiet=True)
    assert "no Dockerfile for builder 'no-such-image-dir'" in e.value.message
