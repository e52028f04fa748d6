"""Runtime dependencies: DT_NEEDED read from real ELF files, the builder's ldd/dpkg/rpm output
parsed into the manifest's runtime_deps, and install's check of them before anything is copied
(the refusal and its apt-get line). No daemons; ELF files are compiled here with the host's cc."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from support.install import make_home, tree_state

CC = shutil.which("cc")


def _compile(tmp: Path, name: str, *flags: str, code: str = "") -> Path:
    if CC is None:
        pytest.skip("no C compiler on this host")
    src = tmp / f"{name}.c"
    src.write_text(code or "#include <zlib.h>\nint main(void){return !zlibVersion()[0];}\n")
    out = tmp / name
    r = subprocess.run([CC, "-o", str(out), str(src), *flags], capture_output=True, text=True,
                       timeout=60)
    if r.returncode != 0:
        pytest.skip(f"cannot compile the test program: {r.stderr.strip()[-200:]}")
    return out


def test_elf_needed_reads_dt_needed_in_order_even_when_stripped(tmp_path):
    from kvmlab.core.elf import elf_needed
    exe = _compile(tmp_path, "withz", "-lz")
    assert elf_needed(exe) == ["libz.so.1", "libc.so.6"]
    stripped = tmp_path / "stripped"
    shutil.copy(exe, stripped)
    if shutil.which("strip"):
        subprocess.run(["strip", "--strip-all", str(stripped)], check=True, timeout=30)
    assert elf_needed(stripped) == ["libz.so.1", "libc.so.6"]
    (tmp_path / "script").write_text("#!/bin/sh\necho hi\n")
    assert elf_needed(tmp_path / "script") is None
    (tmp_path / "bios.bin").write_bytes(b"\x55\xaa" + b"\0" * 510)
    assert elf_needed(tmp_path / "bios.bin") is None


def test_elf_needed_of_a_static_binary_is_empty(tmp_path):
    from kvmlab.core.elf import elf_needed
    exe = _compile(tmp_path, "static", "-static", code="int main(void){return 0;}\n")
    assert elf_needed(exe) == []


def test_native_deps_script_names_the_owning_packages(tmp_path):
    """The script the builder runs, run here on the host (what --builder native does)."""
    if not Path("/usr/bin/dpkg").exists():
        pytest.skip("not a dpkg host")
    from kvmlab.build.deps import deps_native, runtime_deps
    from kvmlab.core.elf import elf_needed
    exe = _compile(tmp_path, "withz", "-lz")
    deps = runtime_deps([("bin/withz", elf_needed(exe))], deps_native([str(exe)], 60))
    by = {d["soname"]: d for d in deps}
    assert set(by) == {"libz.so.1", "libc.so.6"}
    assert by["libz.so.1"]["builder_package"] == "zlib1g:amd64"
    assert by["libz.so.1"]["runtime_package"] == "zlib1g"
    assert by["libc.so.6"]["runtime_package"] == "libc6"
    assert by["libz.so.1"]["needed_by"] == ["bin/withz"]
    assert os.path.exists(by["libz.so.1"]["builder_path"])


RPM_OUTPUT = """@@ldd /b/qemu-kvm
\tlinux-vdso.so.1 =>  (0x00007fff)
\tlibz.so.1 => /lib64/libz.so.1 (0x00007f00)
\tlibgfapi.so.0 => not found
\tlibc.so.6 => /lib64/libc.so.6 (0x00007f01)
@@real
/lib64/libz.so.1 /lib64/libz.so.1.2.3
/lib64/libc.so.6 /lib64/libc-2.12.so
@@owners rpm
zlib: /lib64/libz.so.1
zlib: /lib64/libz.so.1.2.3
glibc: /lib64/libc.so.6
@@end
"""


def test_rpm_builder_output_has_no_debian_package():
    from kvmlab.build.deps import runtime_deps
    deps = runtime_deps([("bin/qemu-kvm", ["libz.so.1", "libgfapi.so.0", "libc.so.6"])],
                        RPM_OUTPUT)
    by = {d["soname"]: d for d in deps}
    assert by["libz.so.1"]["builder_package"] == "zlib"
    assert by["libz.so.1"]["runtime_package"] is None      # no rpm -> deb mapping is guessed
    assert by["libgfapi.so.0"]["builder_path"] is None
    assert by["libgfapi.so.0"]["builder_package"] is None


def test_dpkg_owner_found_through_the_merged_usr_alias():
    from kvmlab.build.deps import runtime_deps
    out = ("@@ldd /b/q\n\tlibpcre2-8.so.0 => /lib/x86_64-linux-gnu/libpcre2-8.so.0 (0x1)\n"
           "@@real\n/lib/x86_64-linux-gnu/libpcre2-8.so.0 "
           "/usr/lib/x86_64-linux-gnu/libpcre2-8.so.0.11.2\n@@owners dpkg\n"
           "libpcre2-8-0:amd64: /usr/lib/x86_64-linux-gnu/libpcre2-8.so.0\n"
           "diversion by foo from: /usr/lib/x86_64-linux-gnu/libpcre2-8.so.0\n@@end\n")
    [d] = runtime_deps([("bin/q", ["libpcre2-8.so.0"])], out)
    assert d["builder_package"] == "libpcre2-8-0:amd64" and d["runtime_package"] == "libpcre2-8-0"


def test_ldconfig_entries_of_the_other_word_size_do_not_count():
    from kvmlab.install.deps import parse_ldconfig
    text = ("3 libs found in cache `/etc/ld.so.cache'\n"
            "\tlibz.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libz.so.1\n"
            "\tlibfoo.so.2 (libc6) => /lib/i386-linux-gnu/libfoo.so.2\n"
            "\tlibbar.so.3 (libc6,x86-64, OS ABI: Linux 3.2.0) => /usr/lib/libbar.so.3\n")
    assert parse_ldconfig(text, "x86_64") == {"libz.so.1", "libbar.so.3"}


# ---------------------------------------------------------------------------------------------
# install refuses before copying anything

MISSING = "libkvmlab-test-missing.so.7"


@pytest.fixture
def env(tmp_path, monkeypatch):
    from kvmlab.core.settings import load_settings
    from kvmlab.model.recipe import load_recipe
    home = make_home(tmp_path / "home")
    for k, v in {"KVMLAB_HOME": str(home), "KVMLAB_STATE_DIR": str(tmp_path / "state"),
                 "KVMLAB_RECIPE": "fake-qemu", "KVMLAB_BUILDER": "native",
                 "KVMLAB_CACHE": str(tmp_path / "cache"),
                 "KVMLAB_LOCK": str(tmp_path / "state" / "kvmlab.lock")}.items():
        monkeypatch.setenv(k, v)
    s = load_settings()
    return s, load_recipe(s.recipes_dir, "fake-qemu"), tmp_path


def _out(s, r, runtime_deps=None) -> Path:
    """A build output (binaries are plain bytes here) with the given runtime_deps key."""
    import hashlib
    out = s.out(r.name, "native")
    arts = []
    for rel in r.artifacts["binaries"]:
        p = out / "bin" / os.path.basename(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"#!/bin/sh\n")
        p.chmod(0o755)
        arts.append({"path": f"bin/{p.name}", "kind": "binary", "size": p.stat().st_size,
                     "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "mode": "0755"})
    m = {"recipe": r.name, "builder": "native", "artifacts": arts, "build_dir": "",
         "config": {"prefix": "/usr/local", "datadir": "/usr/local/share/qemu"}}
    if runtime_deps is not None:
        m["runtime_deps"] = runtime_deps
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def _dep(so, pkg, by="bin/qemu-system-x86_64"):
    return {"soname": so, "needed_by": [by], "builder_path": f"/usr/lib/x86_64-linux-gnu/{so}",
            "builder_package": f"{pkg}:amd64" if pkg else "foo-libs",
            "runtime_package": pkg}


def test_cli_refuses_a_missing_library_with_the_apt_line_and_writes_nothing(env, cli):
    s, r, tmp = env
    _out(s, r, [_dep("libc.so.6", "libc6"), _dep(MISSING, "kvmlab-test-pkg")])
    prefix = tmp / "prefix"
    p = cli("install", "--prefix", str(prefix), "--no-verify")
    assert p.returncode == 1, p.stdout + p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in p.stderr
    assert lines[-2].startswith("error: this host lacks 1 shared library")
    assert f"{MISSING} (kvmlab-test-pkg)" in lines[-2] and "libc.so.6" not in lines[-2]
    sudo = "" if os.geteuid() == 0 else "sudo "
    assert lines[-1] == (f"hint: `{sudo}apt-get install -y --no-install-recommends "
                         "kvmlab-test-pkg` (or run install with --install-deps)")
    assert not prefix.exists()
    assert not (s.state_dir / "installs").exists() or not any((s.state_dir / "installs").iterdir())


def test_unknown_package_is_refused_even_with_install_deps(env):
    from kvmlab import install as inst
    from kvmlab.core.errors import InstallError
    s, r, tmp = env
    _out(s, r, [_dep(MISSING, None)])
    with pytest.raises(InstallError) as ei:
        inst.install(s, r, "native", prefix=str(tmp / "p"), install_deps=True)
    assert f"{MISSING} (no Debian package known; builder's: foo-libs)" in ei.value.message
    assert "apt-file search" in ei.value.hint
    assert not (tmp / "p").exists()


def test_dry_run_reports_the_missing_library_and_old_manifests_still_install(env):
    from kvmlab import install as inst
    s, r, tmp = env
    _out(s, r, [_dep(MISSING, "kvmlab-test-pkg")])
    res = inst.install(s, r, "native", prefix=str(tmp / "p"), dry_run=True)
    assert any(MISSING in w and "apt-get install" in w for w in res.warnings)
    assert tree_state(tmp / "p") == {}
    _out(s, r, None)      # a manifest from before runtime_deps existed
    res = inst.install(s, r, "native", prefix=str(tmp / "p"))
    assert any("records no runtime dependencies" in w for w in res.warnings)
    assert (tmp / "p" / "bin" / "qemu-system-x86_64").is_file()


def test_lab_stops_at_install_with_the_apt_line(env, cli):
    """`invoke lab` runs the same check; --install-deps does not change its options key, so a
    `--resume --install-deps` after this refusal continues from install."""
    from kvmlab.lab.runner import LabOptions, _options_key
    s, r, tmp = env
    _out(s, r, [_dep(MISSING, "kvmlab-test-pkg")])
    skip = "fetch,patch,images,build,install-bios,load-modules,doctor,create-image,guest,boot-test"
    p = cli("lab", "--skip", skip, "--prefix", str(tmp / "p"), "--no-verify")
    assert p.returncode != 0
    tail = " ".join(p.stderr.split())
    assert "lab stopped at install: this host lacks 1 shared library" in tail, p.stderr
    assert "apt-get install -y --no-install-recommends kvmlab-test-pkg" in tail
    assert not (tmp / "p").exists()
    assert "--install-deps" in cli("lab", "--help").stdout
    base = LabOptions(recipe="fake-qemu", builder="native")
    assert _options_key(base) == _options_key(LabOptions(recipe="fake-qemu", builder="native",
                                                         install_deps=True))
