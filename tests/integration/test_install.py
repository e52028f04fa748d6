"""install / install-bios / uninstall against real binaries, real strace, real mounts.

The 0.12-like binary is the fake qemu tree (tests/support/fakeqemu.py) built with the host's C
compiler; it reproduces qemu-kvm 0.12's firmware lookup. The distribution qemu (Debian's 7.2)
is used where installed.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from kvmlab.core.fsutil import sha256_file
from kvmlab.install import preflight, txn
from kvmlab.qemu.binary import distro_qemu as _distro_qemu
from support.install import make_fake_build, make_home, tree_state

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this host")

# the package's own binary (dpkg), not PATH's first hit (after `invoke lab`: 0.12 in /usr/local)
SYS_QEMU = _distro_qemu()
DIST_FW = [d for d in ("/usr/share/seabios", "/usr/share/qemu", "/usr/lib/ipxe/qemu")
           if os.path.isdir(d)]


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Settings + recipe for the fake tree, with a native build in out/fake-qemu/native."""
    from kvmlab.core.settings import load_settings
    from kvmlab.model.recipe import load_recipe
    home = make_home(tmp_path / "home")
    state = tmp_path / "state"
    state.mkdir()
    monkeypatch.setenv("KVMLAB_HOME", str(home))
    monkeypatch.setenv("KVMLAB_STATE_DIR", str(state))
    monkeypatch.setenv("KVMLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KVMLAB_LOCK", str(state / "kvmlab.lock"))
    monkeypatch.setenv("KVMLAB_RECIPE", "fake-qemu")
    monkeypatch.setenv("KVMLAB_BUILDER", "native")
    monkeypatch.delenv("KVMLAB_DEBUG", raising=False)
    s = load_settings()
    r = load_recipe(s.recipes_dir, "fake-qemu")

    class E:
        settings, recipe, tmp = s, r, tmp_path
        out = make_fake_build(s, r, "native", tmp_path / "w",
                              configured_prefix=str(tmp_path / "configured"))
        destdir = tmp_path / "dest"
    return E


def start(binary: Path) -> subprocess.CompletedProcess:
    """Start it paused with the monitor on stdio and quit: what a user would try."""
    return subprocess.run([str(binary), "-S", "-nographic", "-monitor", "stdio"], input="quit\n",
                          capture_output=True, text=True, timeout=30, cwd="/")


def test_install_bios_fixes_the_classic_failure_and_uninstall_restores(env):
    from kvmlab import install as inst
    s, r, dd = env.settings, env.recipe, env.destdir
    root = dd / "usr/local"
    # a previous state to restore: an older qemu-img, an unrelated data file
    (root / "bin").mkdir(parents=True)
    (root / "bin/qemu-img").write_bytes(b"#!/bin/sh\necho old qemu-img\n")
    os.chmod(root / "bin/qemu-img", 0o750)
    (root / "share/qemu/keymaps").mkdir(parents=True)
    (root / "share/qemu/keymaps/en-us").write_text("keep me\n")
    before = tree_state(dd)

    res = inst.install(s, r, "native", prefix="/usr/local", destdir=str(dd))
    by = {Path(x.path).name: x for x in res.rows}
    assert by["qemu-system-x86_64"].status == "installed"
    assert by["qemu-img"].status.startswith("replaced, backup at ")
    assert Path(by["qemu-img"].backup).read_bytes() == b"#!/bin/sh\necho old qemu-img\n"
    qemu = root / "bin/qemu-system-x86_64"
    # share/qemu exists (keymaps) but has no bios.bin: the classic failure
    p = start(qemu)
    assert p.returncode == 1 and "could not load PC BIOS 'bios.bin'" in p.stderr

    b = inst.install_bios(s, r, "native", prefix="/usr/local", destdir=str(dd))
    assert b.search.dirs == [root / "share/qemu"]
    assert b.proof is not None and b.proof.ok, inst.explain_failure(b.proof)
    assert b.proof.loaded["bios.bin"] == str(root / "share/qemu/bios.bin")
    assert {Path(x.path).name for x in b.rows if x.status == "installed"} >= {"bios.bin",
                                                                             "vapic.bin"}
    p = start(qemu)
    assert p.returncode == 0 and "could not load" not in p.stderr and "vapic" not in p.stderr

    # someone deletes bios.bin: it fails again, and says so with the exact path
    (root / "share/qemu/bios.bin").unlink()
    probe = inst.run_probe(qemu)
    assert not probe.ok and probe.missing_fatal == ["bios.bin"]
    if probe.strace:
        assert str(root / "share/qemu/bios.bin") in inst.explain_failure(probe)
    b2 = inst.install_bios(s, r, "native", prefix="/usr/local", destdir=str(dd))
    st = {Path(x.path).name: x.status for x in b2.rows}
    assert st["bios.bin"] == "installed" and st["vapic.bin"] == "already correct"
    assert b2.proof.ok and not b2.noop
    # re-running changes nothing
    b3 = inst.install_bios(s, r, "native", prefix="/usr/local", destdir=str(dd))
    assert b3.noop and b3.proof.ok
    assert inst.install(s, r, "native", prefix="/usr/local", destdir=str(dd)).noop

    m = json.loads(res.manifest_path.read_text())
    assert m["bios"]["search_dirs"] == [str(root / "share/qemu")]
    assert res.manifest_path.parent == s.state_dir / "installs"

    u = inst.uninstall(s, prefix="/usr/local", destdir=str(dd))
    assert str(root / "bin/qemu-img") in u.restored and not u.skipped
    assert tree_state(dd) == before          # same bytes, modes, owners, inodes, mtimes
    assert not res.manifest_path.exists()


@pytest.mark.slow
def test_cli_install_install_bios_verify_uninstall(env, cli):
    dd = str(env.destdir)
    before = tree_state(env.destdir)
    r = cli("install", "--destdir", dd)
    assert r.returncode == 0, r.stderr
    assert "verified install" in r.stdout
    r = cli("install-bios", "--destdir", dd)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "proof:" in r.stdout and "BIOS loaded from" in r.stdout
    assert "verified install" in r.stdout
    r = cli("install-bios", "--destdir", dd, "--no-verify")
    assert r.returncode == 0 and "nothing to do" in r.stdout
    r = cli("verify", "--step", "install")
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli("uninstall", "--destdir", dd)
    assert r.returncode == 0, r.stderr
    assert tree_state(env.destdir) == before


@pytest.mark.slow
def test_verify_catches_a_tampered_file(env, cli):
    from kvmlab import install as inst
    res = inst.install(env.settings, env.recipe, "native", destdir=str(env.destdir))
    path = Path(res.rows[1].path)
    path.write_bytes(b"tampered")
    r = cli("verify", "--step", "install")
    assert r.returncode == 1
    assert "test_installed_files_match_manifest" in r.stdout + r.stderr


def test_missing_artifacts_hint_build(env, cli):
    shutil.rmtree(env.out)
    r = cli("install", "--destdir", str(env.destdir))
    assert r.returncode == 1
    assert "no build artifacts for fake-qemu/native" in r.stderr
    assert "invoke build" in r.stderr and "Traceback" not in r.stderr
    assert not env.destdir.exists()


def test_install_bios_failure_prints_the_path_it_tried(env, cli):
    from kvmlab import install as inst
    inst.install(env.settings, env.recipe, "native", destdir=str(env.destdir))
    # a build output without bios.bin
    mf = env.out / "manifest.json"
    m = json.loads(mf.read_text())
    m["artifacts"] = [a for a in m["artifacts"] if not a["path"].endswith("/bios.bin")]
    mf.write_text(json.dumps(m))
    r = cli("install-bios", "--destdir", str(env.destdir))
    assert r.returncode == 1
    err = " ".join(r.stderr.split())
    assert "still does not get past firmware loading" in err
    assert "could not load PC BIOS 'bios.bin'" in err
    if shutil.which("strace"):
        assert f"it tried for bios.bin: {env.destdir}/usr/local/share/qemu/bios.bin" in err


@pytest.fixture
def ro_prefix(tmp_path):
    """A directory bind-mounted read-only (we are root in CI: a real EROFS, not a chmod)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount")
    src, mnt = tmp_path / "ro-src", tmp_path / "ro"
    (src / "bin").mkdir(parents=True)
    (src / "bin/qemu-img").write_text("old\n")
    mnt.mkdir()
    subprocess.run(["mount", "--bind", str(src), str(mnt)], check=True, timeout=10)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mnt)], check=True, timeout=10)
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True, timeout=10)


def test_prefix_on_read_only_fs_writes_nothing(env, ro_prefix, cli):
    before = tree_state(ro_prefix)
    r = cli("install", "--prefix", str(ro_prefix))
    assert r.returncode == 1
    assert f"cannot write to {ro_prefix}/bin" in r.stderr and "read-only file system" in r.stderr
    assert "nothing was installed" in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("error:")]) == 1
    assert tree_state(ro_prefix) == before
    assert not list((env.settings.state_dir / "installs").glob("*.json"))


def test_root_owned_prefix_as_a_normal_user(env, tmp_path):
    """A real non-root process (uid 65534, allowed to read but not to write others' files)."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run a command as another user")
    prefix = tmp_path / "usr-local"
    (prefix / "bin").mkdir(parents=True)
    os.chmod(tmp_path, 0o755)
    before = tree_state(prefix)
    cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
           "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search",
           sys.executable, "-m", "invoke", "install", "--prefix", str(prefix)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                       cwd=str(REPO), env={**os.environ, "HOME": "/nonexistent"})
    if "Operation not permitted" in r.stderr and "setpriv" in r.stderr:
        pytest.skip("setpriv cannot drop to uid 65534 here: " + r.stderr.strip())
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"cannot write to {prefix}/bin" in r.stderr and "owned by root" in r.stderr
    assert "sudo" in r.stderr and "--prefix" in r.stderr
    assert "Traceback" not in r.stderr
    assert tree_state(prefix) == before


def test_directory_in_the_way(env):
    from kvmlab import install as inst
    from kvmlab.core.errors import InstallError
    root = env.destdir / "usr/local"
    (root / "bin/qemu-io").mkdir(parents=True)
    before = tree_state(env.destdir)
    with pytest.raises(InstallError) as ei:
        inst.install(env.settings, env.recipe, "native", destdir=str(env.destdir))
    assert f"a directory is in the way: {root}/bin/qemu-io" in ei.value.message
    assert tree_state(env.destdir) == before


def test_file_in_the_way_of_a_directory(env):
    from kvmlab import install as inst
    from kvmlab.core.errors import InstallError
    inst.install(env.settings, env.recipe, "native", destdir=str(env.destdir))
    root = env.destdir / "usr/local"
    (root / "share").write_text("not a directory\n")
    before = tree_state(env.destdir)
    with pytest.raises(InstallError) as ei:
        inst.install_bios(env.settings, env.recipe, "native", destdir=str(env.destdir))
    assert f"a file is in the way: {root}/share is not a directory" in ei.value.message
    assert tree_state(env.destdir) == before


@pytest.fixture
def tiny_fs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True,
                   timeout=10)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True, timeout=10)


def test_disk_full_is_refused_before_writing(env, tiny_fs):
    from kvmlab import install as inst
    from kvmlab.core.errors import InstallError
    before = tree_state(tiny_fs)
    with pytest.raises(InstallError) as ei:
        inst.install(env.settings, env.recipe, "native", prefix=str(tiny_fs))
    assert "not enough space on" in ei.value.message and "nothing was installed" in \
        ei.value.message
    assert tree_state(tiny_fs) == before


def test_real_enospc_mid_install_rolls_back(env, tiny_fs, monkeypatch):
    """With the space pre-check blinded, the kernel's ENOSPC hits mid-copy: all undone."""
    from kvmlab import install as inst
    from kvmlab.core.errors import InstallError
    (tiny_fs / "bin").mkdir()
    (tiny_fs / "bin/qemu-system-x86_64").write_bytes(b"the previous qemu\n")
    before = tree_state(tiny_fs)
    monkeypatch.setattr(preflight, "_free_bytes", lambda d: 1 << 40)
    with pytest.raises(InstallError) as ei:
        inst.install(env.settings, env.recipe, "native", prefix=str(tiny_fs))
    assert ei.value.message.startswith("disk full while writing ")
    assert "rolled back" in ei.value.message
    assert tree_state(tiny_fs) == before
    assert not list(tiny_fs.rglob("*kvmlab*"))


def test_failed_write_rolls_back_replacements(env, monkeypatch):
    from kvmlab import install as inst
    from kvmlab.core.errors import InstallError
    inst.install(env.settings, env.recipe, "native", destdir=str(env.destdir))
    first = tree_state(env.destdir)
    manifest = inst.manifest_path(env.settings, str(env.destdir), "/usr/local").read_text()
    # a new build: every binary differs; the 3rd write fails
    for p in (env.out / "bin").iterdir():
        p.write_bytes(p.read_bytes() + b"\0new")
    m = json.loads((env.out / "manifest.json").read_text())
    for a in m["artifacts"]:
        a["sha256"] = sha256_file(env.out / a["path"])
    (env.out / "manifest.json").write_text(json.dumps(m))
    calls = {"n": 0}
    real = txn._copy_data

    def failing(src, dst):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(src, dst)
    monkeypatch.setattr(txn, "_copy_data", failing)
    with pytest.raises(InstallError, match="disk full"):
        inst.install(env.settings, env.recipe, "native", destdir=str(env.destdir))
    assert tree_state(env.destdir) == first
    assert inst.manifest_path(env.settings, str(env.destdir), "/usr/local").read_text() == \
        manifest


def test_symlink_mode_finds_the_build_outputs_firmware(env):
    from kvmlab import install as inst
    res = inst.install(env.settings, env.recipe, "native", destdir=str(env.destdir),
                       mode="symlink")
    q = env.destdir / "usr/local/bin/qemu-system-x86_64"
    assert q.is_symlink() and q.resolve() == (env.out / "bin/qemu-system-x86_64").resolve()
    b = inst.install_bios(env.settings, env.recipe, "native", destdir=str(env.destdir))
    # realpath two levels up is the out dir, whose pc-bios/ already holds everything
    assert b.search.dirs == [env.out.resolve() / "pc-bios"]
    assert b.noop and b.proof.ok
    inst.uninstall(env.settings, destdir=str(env.destdir))
    assert not env.destdir.exists() and not res.manifest_path.exists()


def test_make_install_mode_native(env):
    from kvmlab import install as inst
    res = inst.install(env.settings, env.recipe, "native", destdir=str(env.destdir),
                       mode="make-install")
    names = {Path(x.path).relative_to(env.destdir).as_posix() for x in res.rows}
    # the tree's own make install was configured for <tmp>/configured: mapped to the prefix
    assert "usr/local/bin/qemu-system-x86_64" in names
    assert "usr/local/share/qemu/bios.bin" in names
    assert start(env.destdir / "usr/local/bin/qemu-system-x86_64").returncode == 0
    b = inst.install_bios(env.settings, env.recipe, "native", destdir=str(env.destdir))
    assert b.proof.ok
    assert all(x.status == "already correct" for x in b.rows if x.name != "vapic.bin")
    inst.uninstall(env.settings, destdir=str(env.destdir))
    assert not env.destdir.exists()


def test_binary_names_rename(env, tmp_path):
    from kvmlab import install as inst
    from kvmlab.model.recipe import load_recipe
    home = make_home(tmp_path / "home", extra='binary_names = { "qemu-system-x86_64" = '
                                              '"qemu-kvm" }\n')
    r = load_recipe(home / "recipes", "fake-qemu")
    res = inst.install(env.settings, r, "native", destdir=str(env.destdir))
    assert (env.destdir / "usr/local/bin/qemu-kvm").is_file()
    b = inst.install_bios(env.settings, r, "native", destdir=str(env.destdir))
    assert b.qemu.name == "qemu-kvm" and b.proof.ok
    assert inst.installed_qemu(env.settings) == env.destdir / "usr/local/bin/qemu-kvm"
    inst.uninstall(env.settings, destdir=str(env.destdir))
    assert not res.manifest_path.exists()


def test_installed_qemu_prefers_a_real_install(env, tmp_path):
    from kvmlab import install as inst
    assert inst.installed_qemu(env.settings) is None
    inst.install(env.settings, env.recipe, "native", destdir=str(env.destdir))
    staged = env.destdir / "usr/local/bin/qemu-system-x86_64"
    assert inst.installed_qemu(env.settings) == staged
    real_prefix = tmp_path / "opt"
    inst.install(env.settings, env.recipe, "native", prefix=str(real_prefix))
    assert inst.installed_qemu(env.settings) == real_prefix / "bin/qemu-system-x86_64"
    assert inst.installed_qemu(env.settings, prefix=str(real_prefix)) == \
        real_prefix / "bin/qemu-system-x86_64"
    assert inst.installed_qemu(env.settings, prefix="/nonexistent") is None


@pytest.mark.qemu
@pytest.mark.skipif(SYS_QEMU is None or not DIST_FW,
                    reason="Debian's qemu-system-x86 is not installed "
                           "(apt-get install qemu-system-x86)")
def test_distribution_qemu_search_path_and_install_bios(env, tmp_path):
    """Debian's qemu 7.2 copied into a prefix: several data dirs (`-L help`), other names."""
    from kvmlab import install as inst
    prefix = tmp_path / "dist"
    (prefix / "bin").mkdir(parents=True)
    shutil.copy2(os.path.realpath(SYS_QEMU), prefix / "bin/qemu-system-x86_64")
    # its accelerator modules are found relative to the binary too
    for moddir in Path("/usr/lib").glob("*/qemu"):
        if list(moddir.glob("accel-*.so")):
            (prefix / "lib" / moddir.parent.name).mkdir(parents=True)
            (prefix / "lib" / moddir.parent.name / "qemu").symlink_to(moddir)
    q = prefix / "bin/qemu-system-x86_64"
    before = tree_state(prefix)
    probe = inst.run_probe(q)
    assert not probe.ok and probe.missing_fatal, probe.stderr
    lhelp = inst.qemu_l_help(q)
    assert lhelp and lhelp[0] == prefix / "share/qemu" and len(lhelp) > 1

    b = inst.install_bios(env.settings, env.recipe, "native", qemu=str(q),
                          firmware_from=DIST_FW)
    assert b.search.method == "-L help" and b.search.dirs == lhelp
    assert b.proof.ok, inst.explain_failure(b.proof)
    for d in lhelp:
        assert (d / "bios.bin").is_file() and (d / "vapic.bin").is_file()
    loaded = next(v for k, v in b.proof.loaded.items() if k.startswith("bios"))
    assert Path(loaded).parent in lhelp
    b2 = inst.install_bios(env.settings, env.recipe, "native", qemu=str(q),
                           firmware_from=DIST_FW)
    assert b2.noop and b2.proof.ok
    inst.uninstall(env.settings, prefix=str(prefix))
    assert tree_state(prefix) == before


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")
def test_observation_beats_prediction_for_a_wrapper_with_L(env, tmp_path):
    """A wrapper script that passes -L (like distributions' `kvm` wrappers): the 0.12 rule
    predicts PREFIX/share/qemu, but the binary really searches the -L directory."""
    from kvmlab import install as inst
    prefix = tmp_path / "px"
    inst.install(env.settings, env.recipe, "native", prefix=str(prefix))
    bindir = prefix / "bin"
    real = bindir / "qemu-system-x86_64"
    fwdir = tmp_path / "wrapper-fw"
    wrapper = bindir / "kvm"
    wrapper.write_text(f'#!/bin/sh\nexec {real} -L {fwdir} "$@"\n')
    wrapper.chmod(0o755)
    b = inst.install_bios(env.settings, env.recipe, "native", qemu=str(wrapper),
                          prefix=str(prefix))
    assert b.search.method == "observed (strace)" and b.search.dirs == [fwdir]
    assert b.proof.ok and (fwdir / "bios.bin").is_file()
    assert b.proof.loaded["bios.bin"] == str(fwdir / "bios.bin")
    assert not (prefix / "share").exists()
    wrapper.unlink()
    inst.uninstall(env.settings, prefix=str(prefix))
    assert not fwdir.exists() and not prefix.exists()


def test_destdir_install_never_writes_outside_destdir(env, tmp_path):
    """The same wrapper under DESTDIR: its -L dir lies outside DESTDIR, so it is reported, not
    written; the proof then fails and names the path."""
    if shutil.which("strace") is None:
        pytest.skip("strace not installed")
    from kvmlab import install as inst
    inst.install(env.settings, env.recipe, "native", destdir=str(env.destdir))
    bindir = env.destdir / "usr/local/bin"
    fwdir = tmp_path / "outside"
    wrapper = bindir / "kvm"
    wrapper.write_text(f'#!/bin/sh\nexec {bindir}/qemu-system-x86_64 -L {fwdir} "$@"\n')
    wrapper.chmod(0o755)
    b = inst.install_bios(env.settings, env.recipe, "native", qemu=str(wrapper),
                          prefix="/usr/local", destdir=str(env.destdir))
    assert not fwdir.exists() and not b.proof.ok
    assert any(f"searches {fwdir}, outside --destdir" in w for w in b.warnings)
    assert f"{fwdir}/bios.bin" in inst.explain_failure(b.proof)


def test_immutable_data_dir_is_refused_before_writing(env):
    """chattr +i: even root cannot write there; install-bios says why and writes nothing."""
    if os.geteuid() != 0 or not shutil.which("chattr"):
        pytest.skip("needs root and chattr")
    from kvmlab import install as inst
    from kvmlab.core.errors import InstallError
    inst.install(env.settings, env.recipe, "native", destdir=str(env.destdir))
    data = env.destdir / "usr/local/share/qemu"
    data.mkdir(parents=True)
    r = subprocess.run(["chattr", "+i", str(data)], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        pytest.skip(f"this file system has no immutable attribute: {r.stderr.strip()}")
    try:
        before = tree_state(env.destdir)
        with pytest.raises(InstallError) as ei:
            inst.install_bios(env.settings, env.recipe, "native", destdir=str(env.destdir))
        assert f"cannot write to {data} even as root: immutable attribute" in ei.value.message
        assert tree_state(env.destdir) == before
    finally:
        subprocess.run(["chattr", "-i", str(data)], check=True, timeout=10)


@pytest.mark.slow
def test_path_prefix_binaries_found_on_path(env, cli, tmp_path, monkeypatch):
    prefix = tmp_path / "pfx"
    monkeypatch.setenv("PATH", f"{prefix}/bin:{os.environ['PATH']}")
    monkeypatch.setenv("COLUMNS", "200")
    assert cli("install", "--prefix", str(prefix)).returncode == 0
    assert cli("install-bios", "--prefix", str(prefix), "--no-verify").returncode == 0
    r = cli("verify", "--step", "install", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {x["name"]: x["status"] for x in json.loads(r.stdout)["results"]}
    assert rows["test_binaries_on_path"] == "passed"
    assert rows["test_firmware_in_every_search_dir"] == "passed"
    assert rows["test_qemu_binaries_answer_version"] == "passed"
    assert cli("uninstall", "--prefix", str(prefix)).returncode == 0
    assert not prefix.exists()


def test_uninstall_only_the_firmware(env):
    from kvmlab import install as inst
    inst.install(env.settings, env.recipe, "native", destdir=str(env.destdir))
    after_install = tree_state(env.destdir)
    b = inst.install_bios(env.settings, env.recipe, "native", destdir=str(env.destdir))
    assert b.proof.ok
    u = inst.uninstall(env.settings, destdir=str(env.destdir), step="install-bios")
    assert all("/share/qemu/" in p for p in u.removed)
    assert tree_state(env.destdir) == after_install
    m = json.loads(b.manifest_path.read_text())
    assert m["bios"] is None and {e["step"] for e in m["files"]} == {"install"}
    inst.uninstall(env.settings, destdir=str(env.destdir))
    assert not env.destdir.exists()


def test_compat_dirs_from_the_recipe(env, tmp_path):
    """RHEL 6 layout: bios.bin also in /usr/share/seabios (under DESTDIR), relative dirs under
    the prefix."""
    from kvmlab import install as inst
    from kvmlab.model.recipe import load_recipe
    home = make_home(tmp_path / "home",
                     extra='firmware_compat_dirs = ["/usr/share/seabios", "share/qemu-kvm"]\n')
    r = load_recipe(home / "recipes", "fake-qemu")
    inst.install(env.settings, r, "native", destdir=str(env.destdir))
    b = inst.install_bios(env.settings, r, "native", destdir=str(env.destdir))
    assert b.proof.ok
    for d in ("usr/local/share/qemu", "usr/share/seabios", "usr/local/share/qemu-kvm"):
        assert (env.destdir / d / "bios.bin").is_file()
        assert (env.destdir / d / "vapic.bin").is_file()
    m = json.loads(b.manifest_path.read_text())
    assert m["bios"]["compat_dirs"] == [str(env.destdir / "usr/share/seabios"),
                                        str(env.destdir / "usr/local/share/qemu-kvm")]
    inst.uninstall(env.settings, destdir=str(env.destdir))
    assert not env.destdir.exists()


def test_identical_files_from_another_state_are_adopted_and_kept(env, tmp_path, monkeypatch):
    """A used host: the same build already installed from another state dir (another clone).
    The second install records the identical files (its checks see them) but does not own
    them: its uninstall leaves them; the first owner's uninstall removes them."""
    from kvmlab import install as inst
    from kvmlab.core.settings import load_settings
    from kvmlab.lab import verify
    s, r, dd = env.settings, env.recipe, env.destdir
    inst.install(s, r, "native", prefix="/usr/local", destdir=str(dd))
    before = tree_state(dd)
    other = tmp_path / "other-state"
    other.mkdir()
    shutil.copytree(s.out(r.name, "native"), other / "out" / r.name / "native")
    monkeypatch.setenv("KVMLAB_STATE_DIR", str(other))
    s2 = load_settings()
    res = inst.install(s2, r, "native", prefix="/usr/local", destdir=str(dd))
    assert res.noop and all(x.status == "already correct" for x in res.rows)
    m = json.loads(res.manifest_path.read_text())
    assert {e["path"] for e in m["files"]} == {x.path for x in res.rows}
    assert all(e.get("adopted") for e in m["files"])
    rep = verify.run_checks(s2, ["install"], ["local://"],
                            extra_env={"KVMLAB_VERIFY_INSTALL_MANIFEST": str(res.manifest_path)})
    ran = {c.name: c.status for c in rep.results}
    assert ran["test_installed_files_match_manifest"] == "passed", rep.results
    u = inst.uninstall(s2, prefix="/usr/local", destdir=str(dd), recipe=r.name)
    assert sorted(u.kept) == sorted(x.path for x in res.rows) and not u.removed
    assert tree_state(dd) == before                 # nothing of the first install touched
    monkeypatch.setenv("KVMLAB_STATE_DIR", str(s.state_dir))
    u1 = inst.uninstall(load_settings(), prefix="/usr/local", destdir=str(dd), recipe=r.name)
    assert u1.removed and not any((dd / "usr/local/bin").glob("qemu-*"))
