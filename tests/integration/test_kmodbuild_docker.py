"""The real thing: kvm.ko + kvm-intel.ko + kvm-amd.ko from Debian's linux-source-6.1, built against
linux-headers of the same version in the debian12-kmod builder (kernel build system, real .ko
files), plus the compat header through the builder's gcc with and without the headers' own
include/linux/kconfig.h.

One build is shared by the whole module (the image and the extracted source are reused, ccache
is warm for the debug-vmx rebuild). Needs dockerd and the Debian apt mirror (image build).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kvmlab.build import kmod as kmodbuild
from kvmlab.build import kmodules
from kvmlab.core import elf
from support.build import container_names
from support.kmod import COMPAT_HEADER, PROBE_C, REPO

pytestmark = [pytest.mark.slow, pytest.mark.docker]
RECIPE = "kvm-kmod-6.1"


def _docker_or_skip():
    from kvmlab.build import images
    from kvmlab.core.errors import DockerError
    try:
        return images.docker_client()
    except DockerError as e:
        pytest.skip(f"no docker daemon: {e.message}")


@pytest.fixture(scope="module")
def kmod_state(tmp_path_factory):
    """Settings with a private state dir (the shared ccache volume and images are reused)."""
    from kvmlab.core.settings import load_settings
    _docker_or_skip()
    base = tmp_path_factory.mktemp("kmod")
    mp = pytest.MonkeyPatch()
    mp.setenv("KVMLAB_HOME", str(REPO))
    mp.setenv("KVMLAB_STATE_DIR", str(base / "state"))
    mp.setenv("KVMLAB_CACHE", str(base / "cache"))
    mp.setenv("KVMLAB_LOCK", str(base / "state/kvmlab.lock"))
    (base / "state").mkdir()
    yield load_settings(), base
    mp.undo()


@pytest.fixture(scope="module")
def built(kmod_state):
    s, _ = kmod_state
    return kmodbuild.build_kmod(s, RECIPE, "debian12", jobs=2, quiet=True)


def test_builds_the_three_modules_for_the_headers_version(built):
    m = built.manifest
    assert not built.noop
    names = [a["path"] for a in m["artifacts"]]
    assert names == ["kvm.ko", "kvm-intel.ko", "kvm-amd.ko"]
    release = m["headers"]["release"]
    assert release == "6.1.0-50-amd64" == m["kernel_release"]
    assert m["headers"]["version"] == m["source"]["version"] == "6.1.176-1"
    for a in m["artifacts"]:
        p = built.out_dir / a["path"]
        assert p.is_file() and p.stat().st_size == a["size"] > 100_000
        assert kmodules.sha256_file(p) == a["sha256"]
        info = elf.read_modinfo(p)
        assert info["vermagic"] == a["vermagic"]
        assert info["vermagic"].split()[0] == release
        assert "mod_unload" in info["vermagic"] and "modversions" in info["vermagic"]
        assert re.fullmatch(r"[0-9a-f]{40}", a["build_id"])
        assert a["build_id_note"].endswith(a["build_id"])
    by = {a["name"]: a for a in m["artifacts"]}
    # Debian 6.1: kvm needs irqbypass, kvm_amd needs ccp (SEV), both from the running kernel
    assert by["kvm"]["depends"] == ["irqbypass"] and by["kvm_intel"]["depends"] == ["kvm"]
    assert "kvm" in by["kvm_amd"]["depends"]
    paths = [built.out_dir / a["path"] for a in m["artifacts"]]
    assert set(kmodules.external_depends(paths)) == {"irqbypass", "ccp"}
    assert m["compat"]["items"] == []          # 6.1 headers + gcc 12: nothing to add
    assert m["compiler"].startswith("gcc")


def test_modinfo_program_agrees(built):
    prog = shutil.which("modinfo") or ("/usr/sbin/modinfo" if Path("/usr/sbin/modinfo").exists()
                                       else None)
    if prog is None:
        pytest.skip("modinfo (kmod) is not installed on this host")
    for a in built.manifest["artifacts"]:
        out = subprocess.run([prog, "-F", "vermagic", str(built.out_dir / a["path"])],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == a["vermagic"].strip()


def test_vermagic_mismatch_is_detected_before_insmod(built):
    kvm = built.out_dir / "kvm.ko"
    assert kmodules.check_vermagic(kvm, "6.1.0-50-amd64")["name"] == "kvm"
    other = os.uname().release if os.uname().release != "6.1.0-50-amd64" else "6.18.0-other"
    with pytest.raises(kmodules.VermagicMismatch) as e:
        kmodules.check_vermagic(built.out_dir / "kvm-intel.ko", other)
    assert "6.1.0-50-amd64" in e.value.message and other in e.value.message
    order = kmodules.modules_from(built.out_dir)
    assert [p.name for p in order][0] == "kvm.ko"


def test_second_build_is_a_noop(kmod_state, built):
    s, _ = kmod_state
    again = kmodbuild.build_kmod(s, RECIPE, "debian12", jobs=2, quiet=True)
    assert again.noop and again.manifest["inputs_sha256"] == built.manifest["inputs_sha256"]


def test_debug_vmx_series_builds_and_adds_the_printks(kmod_state, built):
    s, base = kmod_state
    rdir = base / "recipes"
    rdir.mkdir(exist_ok=True)
    text = (REPO / "recipes" / f"{RECIPE}.toml").read_text()
    assert "debug-vmx = false" in text
    (rdir / f"{RECIPE}.toml").write_text(text.replace("debug-vmx = false", "debug-vmx = true"))
    s2 = type(s)(**{**s.__dict__, "recipes_dir": rdir})
    plain_intel = (built.out_dir / "kvm-intel.ko").read_bytes()
    plain_kvm_sha = {a["name"]: a["sha256"] for a in built.manifest["artifacts"]}
    dbg = kmodbuild.build_kmod(s2, RECIPE, "debian12", jobs=2, quiet=True)
    assert [p["name"] for p in dbg.manifest["patches"]] == [
        "debug-vmx-enable.patch", "debug-vmx-entry.patch"]
    intel = (dbg.out_dir / "kvm-intel.ko").read_bytes()
    for marker in (b"kvm-debug: VMXON ok on cpu", b"IA32_FEATURE_CONTROL (0x3a) = 0x",
                   b"kvm-debug: VM-entry failed on cpu", b"entry controls 0x"):
        assert marker in intel and marker not in plain_intel, marker
    sha = {a["name"]: a["sha256"] for a in dbg.manifest["artifacts"]}
    # the series touches vmx.c only: the same sources give bit-identical kvm.ko / kvm-amd.ko
    assert sha["kvm"] == plain_kvm_sha["kvm"] and sha["kvm_amd"] == plain_kvm_sha["kvm_amd"]
    assert sha["kvm_intel"] != plain_kvm_sha["kvm_intel"]


def test_compat_header_in_the_builder_against_the_real_kconfig_h(kmod_state, built):
    """The builder's gcc: with the 6.1 headers' own kconfig.h the compat header changes no macro;
    without it, it alone makes the probe compile, with the same answers as kconfig.h's."""
    from kvmlab.build.containers import LogSink, build_binds, run_in_container
    s, base = kmod_state
    m = built.manifest
    common = [d for d in m["facts"]["HEADER_DIRS"].split() if d.endswith("-common")][0]
    work = base / "compat-probe"
    work.mkdir()
    shutil.copy(COMPAT_HEADER, work / "kvmlab-compat.h")
    (work / "probe.c").write_text(PROBE_C)
    (work / "empty.c").write_text("")
    kconfig = f"{common}/include/linux/kconfig.h"
    inc = f"-I {m['headers']['dir']}/include -I {common}/include"
    script = "\n".join([
        "set -e",
        f"gcc -E -dM {inc} -include {kconfig} empty.c | sort > with-kconfig.txt",
        f"gcc -E -dM {inc} -include {kconfig} -include kvmlab-compat.h empty.c | sort "
        "> with-kconfig-and-compat.txt",
        f"gcc -c {inc} -include {kconfig} probe.c -o kconfig.o",
        "gcc -c -include kvmlab-compat.h probe.c -o compat.o",
        "if gcc -c probe.c -o none.o 2>none.err; then echo NONE-COMPILED; fi",
        "grep -c '#define IS_ENABLED' with-kconfig.txt",
    ])
    sink = LogSink(work / "probe.log", quiet=True)
    try:
        rc = run_in_container(_docker_or_skip(), m["image"], script, workdir=work,
                              binds=build_binds(work), env={"LC_ALL": "C"}, sink=sink,
                              name=f"kvmlab-test-kmod-compat-{os.getpid()}", timeout=300)
    finally:
        sink.close()
    log = (work / "probe.log").read_text()
    assert rc == 0, log
    assert "NONE-COMPILED" not in log          # without either, IS_ENABLED does not exist
    assert (work / "with-kconfig.txt").read_text() == \
        (work / "with-kconfig-and-compat.txt").read_text()
    assert "#define IS_ENABLED(" in (work / "with-kconfig.txt").read_text()
    assert (work / "kconfig.o").is_file() and (work / "compat.o").is_file()


def test_fetched_kernel_tarball_gives_the_same_modules(kmod_state, built):
    """kmod.source = "fetch": a kernel tarball (file:// URL + sha256, through kvmlab.source.fetch) built
    in another state dir gives bit-identical modules (no build-dir paths in the .ko files)."""
    import hashlib
    import tarfile
    s, base = kmod_state
    pristine = s.work(RECIPE) / "kmod-src-debian12"
    tarball = base / "linux-6.1-kvm.tar.gz"
    with tarfile.open(tarball, "w:gz") as tf:
        for d in ("arch", "virt"):
            tf.add(pristine / d, arcname=f"linux-6.1/{d}")
    sha = hashlib.sha256(tarball.read_bytes()).hexdigest()
    text = (REPO / "recipes" / f"{RECIPE}.toml").read_text()
    text = re.sub(r'(?m)^file = .*$', 'file = "linux-6.1-kvm.tar.gz"', text, count=1)
    text = re.sub(r'(?m)^urls = .*$', f'urls = ["file://{tarball}"]', text, count=1)
    text = re.sub(r'(?m)^sha256 = .*$', f'sha256 = "{sha}"', text, count=1)
    text = text.replace('source = "image"', 'source = "fetch"')
    rdir = base / "recipes-fetch"
    rdir.mkdir()
    (rdir / f"{RECIPE}.toml").write_text(text)
    s3 = type(s)(**{**s.__dict__, "recipes_dir": rdir, "state_dir": base / "state-fetch",
                    "cache": base / "cache-fetch", "lock": base / "state-fetch/kvmlab.lock"})
    res = kmodbuild.build_kmod(s3, RECIPE, "debian12", jobs=2, quiet=True)
    m = res.manifest
    assert m["source"]["origin"] == f"file://{tarball}" and m["source_sha256"] == sha
    assert m["build_dir"] != built.manifest["build_dir"]
    assert [(a["path"], a["sha256"]) for a in m["artifacts"]] == \
        [(a["path"], a["sha256"]) for a in built.manifest["artifacts"]]


def test_ctrl_c_removes_the_container_and_leaves_no_half_tree(tmp_path):
    """Interrupt a build while its container runs: the container is removed, no temp tree and no
    output are left behind, and the exit is the interrupt's."""
    import signal
    import sys
    import time
    client = _docker_or_skip()
    env = {**os.environ, "KVMLAB_HOME": str(REPO), "KVMLAB_STATE_DIR": str(tmp_path / "state"),
           "KVMLAB_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    code = ("from kvmlab.core.settings import load_settings\n"
            "from kvmlab.build import kmod as kmodbuild\n"
            f"kmodbuild.build_kmod(load_settings(), {RECIPE!r}, 'debian12', quiet=True)\n")
    p = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    prefix = f"kvmlab-kmod-{RECIPE}-debian12-"
    try:
        name = None
        deadline = time.monotonic() + 300
        while name is None and time.monotonic() < deadline and p.poll() is None:
            for n in container_names(client, label="io.kvmlab.build.qemu"):
                if n.startswith(prefix) and n.endswith(f"-{p.pid}"):
                    name = n
            time.sleep(0.3)
        assert name, "the build's container never appeared"
        time.sleep(1)
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:  # the test itself failed: SIGKILL skips the build's own cleanup
            p.kill()
            p.wait()
            for n in container_names(client, label="io.kvmlab.build.qemu"):
                if n.startswith(prefix) and n.endswith(f"-{p.pid}"):
                    client.api.remove_container(n, force=True)
    assert p.returncode != 0 and "KeyboardInterrupt" in out
    left = [n for n in container_names(client) if n == name]
    assert left == [], f"container {name} was left behind"
    work = tmp_path / "state/work" / RECIPE
    assert not list(work.glob(".*tmp*")), list(work.glob(".*tmp*"))
    assert not (tmp_path / "state/out" / RECIPE / "debian12").exists()
