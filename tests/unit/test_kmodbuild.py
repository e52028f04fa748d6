"""kmodbuild without docker: the compat layer through the host's gcc, the facts script and compat
plan, .modinfo reading from real gcc-made ELF objects, vermagic checks, load order, recipes."""
from __future__ import annotations

import json
import lzma
import shutil
import subprocess
from pathlib import Path

import pytest

from kvmlab.build import kmod as kmodbuild
from kvmlab.build import kmodspec, kmodules
from kvmlab.core import elf
from kvmlab.core.errors import BuildError, HostError, RecipeError
from kvmlab.model.recipe import load_recipe, parse_recipe
from support.kmod import COMPAT_HEADER, PROBE_C, REPO, cc, gcc, macro_table, make_module_object

needs_gcc = pytest.mark.skipif(gcc() is None, reason="gcc is not installed on this host")
REL = "6.1.0-50-amd64"
VERMAGIC = f"{REL} SMP preempt mod_unload modversions "


# --------------------------------------------------------------------------------------------
# the compat header, through the host's gcc

@needs_gcc
def test_without_compat_header_is_enabled_does_not_exist(tmp_path):
    (tmp_path / "probe.c").write_text(PROBE_C)
    p = cc(["-c", "probe.c", "-o", "probe.o"], tmp_path)
    assert p.returncode != 0
    assert "IS_ENABLED" in p.stderr or "missing binary operator" in p.stderr


@needs_gcc
@pytest.mark.parametrize("module", [False, True])
def test_compat_header_gives_kernel_semantics(tmp_path, module):
    (tmp_path / "probe.c").write_text(PROBE_C + (
        "_Static_assert(IS_REACHABLE(CONFIG_M) == %d, \"reachable\");\n" % int(module)))
    args = ["-c", "-include", str(COMPAT_HEADER), "probe.c", "-o", "probe.o"]
    p = cc((["-DMODULE"] if module else []) + args, tmp_path)
    assert p.returncode == 0, p.stderr


@needs_gcc
def test_compat_header_is_a_noop_when_the_macros_exist(tmp_path):
    # Stand-ins with bodies of their own: whatever the kernel defines must survive untouched,
    # and the header must add nothing (not even helpers or a guard macro).
    kdefs = tmp_path / "kdefs.h"
    kdefs.write_text("#define IS_BUILTIN(o) kernel_builtin(o)\n#define IS_MODULE(o) "
                     "kernel_module(o)\n#define IS_ENABLED(o) kernel_enabled(o)\n"
                     "#define IS_REACHABLE(o) kernel_reachable(o)\n")
    without = macro_table(["-include", str(kdefs)], tmp_path)
    with_compat = macro_table(["-include", str(kdefs), "-include", str(COMPAT_HEADER)], tmp_path)
    assert with_compat == without
    # included twice (or before and after) it is still harmless
    twice = macro_table(["-include", str(COMPAT_HEADER), "-include", str(COMPAT_HEADER)],
                        tmp_path)
    assert "#define IS_ENABLED(option) (IS_BUILTIN(option) || IS_MODULE(option))" in twice


@needs_gcc
def test_compat_header_fills_in_only_what_is_missing(tmp_path):
    # Linux 3.1 .. 4.0: IS_ENABLED & co. exist, IS_REACHABLE does not.
    kdefs = tmp_path / "kdefs.h"
    kdefs.write_text("#define IS_BUILTIN(o) kernel_builtin(o)\n#define IS_MODULE(o) "
                     "kernel_module(o)\n#define IS_ENABLED(o) kernel_enabled(o)\n")
    without = macro_table(["-include", str(kdefs)], tmp_path)
    with_compat = macro_table(["-include", str(kdefs), "-include", str(COMPAT_HEADER)], tmp_path)
    assert without <= with_compat
    added = {line.split()[1].split("(")[0] for line in with_compat - without}
    assert "IS_REACHABLE" in added
    assert not added & {"IS_BUILTIN", "IS_MODULE", "IS_ENABLED"}


# --------------------------------------------------------------------------------------------
# the gcc flags, proven with the host's gcc (Debian gcc 12)

def _item(name):
    return next(i for i in kmodspec.COMPAT if i.name == name)


@needs_gcc
def test_no_pie_flag_is_what_old_kernel_code_needs_with_a_default_pie_gcc(tmp_path):
    p = subprocess.run(["gcc", "-dM", "-E", "-"], input="", capture_output=True, text=True,
                       timeout=30)
    if "__PIE__" not in p.stdout:
        pytest.skip("this gcc does not default to PIE: the no-pie item would not apply")
    (tmp_path / "t.c").write_text("int x;\nint f(void) { return x; }\n")
    # what a < 4.9 kernel Makefile passes on x86_64, without -fno-PIE
    base = ["-mcmodel=kernel", "-c", "t.c", "-o", "t.o"]
    p = cc(base, tmp_path)
    assert p.returncode != 0 and "code model kernel does not support PIC mode" in p.stderr
    flags = _item("no-pie").kcflags({}, "/x")
    assert cc(flags + base, tmp_path).returncode == 0


@needs_gcc
def test_gnu89_flag_is_what_old_extern_inline_code_needs_with_gcc5_or_later(tmp_path):
    (tmp_path / "h.h").write_text("extern inline int f(void) { return 1; }\n")
    (tmp_path / "a.c").write_text('#include "h.h"\nint a(void) { return f(); }\n')
    (tmp_path / "b.c").write_text('#include "h.h"\nint b(void) { return f(); }\n')

    def link(flags):
        for n in "ab":
            assert cc(flags + ["-O2", "-c", f"{n}.c", "-o", f"{n}.o"], tmp_path).returncode == 0
        return subprocess.run(["ld", "-r", "a.o", "b.o", "-o", "ab.o"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=30)
    p = link([])
    assert p.returncode != 0 and "multiple definition" in p.stderr
    assert link(_item("gnu89").kcflags({}, "/x")).returncode == 0


@needs_gcc
def test_compiler_gcc_shim_for_kernels_that_include_compiler_gccN(tmp_path):
    # A header tree with the < 4.2 scheme: compiler-gcc.h includes compiler-gcc<__GNUC__>.h.
    inc = tmp_path / "inc/linux"
    inc.mkdir(parents=True)
    (inc / "compiler-gcc.h").write_text(
        "#define __gcc_header(x) #x\n#define _gcc_header(x) __gcc_header(linux/compiler-gcc##x.h)"
        "\n#define gcc_header(x) _gcc_header(x)\n#include gcc_header(__GNUC__)\n")
    (inc / "compiler-gcc4.h").write_text("#define KVMLAB_TEST_GCC4_RULES 1\n")
    (tmp_path / "t.c").write_text("#include <linux/compiler-gcc.h>\n"
                                  "int x = KVMLAB_TEST_GCC4_RULES;\n")
    p = cc(["-I", "inc", "-c", "t.c", "-o", "t.o"], tmp_path)
    major = subprocess.run(["gcc", "-dumpversion"], capture_output=True, text=True,
                           timeout=30).stdout.strip().split(".")[0]
    assert p.returncode != 0 and f"compiler-gcc{major}.h" in p.stderr
    facts = {"COMPILER_GCC_SCHEME": "yes", "COMPILER_GCC_HEADERS": "compiler-gcc4.h",
             "GCC_VERSION": f"{major}.1.0", "HAS_IS_ENABLED": "yes", "GCC_DEFAULT_PIE": "no",
             "KERNEL_NO_PIE": "yes", "KERNEL_STD": "yes"}
    compat_dir = tmp_path / "compat"
    plan = kmodspec.compat_plan(facts, None, str(compat_dir))
    assert plan.items == ("compiler-gcc-shim",)
    for rel, text in plan.files.items():
        (compat_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (compat_dir / rel).write_text(text)
    p = cc(["-I", "inc", *plan.kcflags, "-c", "t.c", "-o", "t.o"], tmp_path)
    assert p.returncode == 0, p.stderr


# --------------------------------------------------------------------------------------------
# facts (the real shell script, run on this host against header trees) and the plan

def _headers_tree(root: Path, *, is_enabled: bool, makefile: str) -> Path:
    h = root / "headers"
    (h / "include/linux").mkdir(parents=True)
    (h / "include/generated").mkdir(parents=True)
    (h / "include/generated/utsrelease.h").write_text(f'#define UTS_RELEASE "{REL}"\n')
    (h / "Makefile").write_text(makefile)
    if is_enabled:
        (h / "include/linux/kconfig.h").write_text(
            "#define IS_ENABLED(option) __or(IS_BUILTIN(option), IS_MODULE(option))\n")
    return h


def _spec(headers: Path) -> kmodspec.KmodSpec:
    return kmodspec.KmodSpec(
        source="image", source_path="/x.tar.xz", source_sha256="unknown", source_package="",
        package_version="", headers_package="kvmlab-no-such-package", headers=str(headers),
        kernel_release=REL, dirs=("arch/x86/kvm",), module_dir="arch/x86/kvm", compat="kmod",
        kcflags=())


@needs_gcc
@pytest.mark.parametrize("old", [False, True])
def test_facts_script_detects_what_the_headers_have(tmp_path, old):
    mk = "KBUILD_CFLAGS := -O2\n" if old else \
        "KBUILD_CFLAGS := -fno-PIE -std=gnu11\n"
    h = _headers_tree(tmp_path, is_enabled=not old, makefile=mk)
    facts_file = tmp_path / "facts.env"
    p = subprocess.run(["sh", "-c", kmodspec.facts_script(_spec(h), str(facts_file))],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    f = kmodspec.parse_facts(facts_file.read_text())
    assert f["UTS_RELEASE"] == REL
    assert f["HAS_IS_ENABLED"] == ("no" if old else "yes")
    assert f["KERNEL_NO_PIE"] == ("no" if old else "yes")
    assert f["KERNEL_STD"] == ("no" if old else "yes")
    assert f["GCC_VERSION"][0].isdigit()
    plan = kmodspec.compat_plan(f, REPO / "compat/kmod", "/b/kvmlab-compat")
    if old:
        assert "is-enabled" in plan.items and "gnu89" in plan.items
        assert plan.kcflags[:2] == ("-include", "/b/kvmlab-compat/kvmlab-compat.h")
        assert plan.files["kvmlab-compat.h"] == COMPAT_HEADER.read_text()
    else:
        assert plan.items == () and plan.kcflags == () and plan.files == {}


def test_plan_for_gcc44_and_2632_needs_only_is_enabled():
    facts = {"HAS_IS_ENABLED": "no", "GCC_VERSION": "4.4.7", "GCC_DEFAULT_PIE": "no",
             "KERNEL_NO_PIE": "no", "KERNEL_STD": "no", "COMPILER_GCC_SCHEME": "yes",
             "COMPILER_GCC_HEADERS": "compiler-gcc3.h compiler-gcc4.h"}
    plan = kmodspec.compat_plan(facts, REPO / "compat/kmod", "/c")
    assert plan.items == ("is-enabled",)
    facts["GCC_VERSION"], facts["GCC_DEFAULT_PIE"] = "12.2.0", "yes"
    plan = kmodspec.compat_plan(facts, REPO / "compat/kmod", "/c")
    assert plan.items == ("is-enabled", "no-pie", "gnu89", "compiler-gcc-shim")
    assert plan.files["include/linux/compiler-gcc12.h"].rstrip().endswith(
        "#include <linux/compiler-gcc4.h>")


def test_compat_items_say_which_kernel_and_compiler_they_are_for():
    for item in kmodspec.COMPAT:
        assert "Linux" in item.why and ("gcc" in item.why or "IS_ENABLED" in item.why)
    head = COMPAT_HEADER.read_text().split("*/")[0]
    assert "For:" in head and "older than Linux 3.1" in head


def test_kbuild_wrapper_redirects_only_paths_in_the_tree(tmp_path):
    (tmp_path / "virt/kvm").mkdir(parents=True)
    (tmp_path / "virt/kvm/Makefile.kvm").write_text("")
    (tmp_path / "arch/x86/kvm").mkdir(parents=True)
    text = ("ccflags-y += -I $(srctree)/arch/x86/kvm\ninclude $(srctree)/virt/kvm/Makefile.kvm\n"
            "x := $(srctree)/scripts/foo\n")
    out = kmodbuild.kbuild_wrapper(text, Path("/b"), tmp_path)
    assert "KVMLAB_SRC := /b\n" in out
    assert "-I $(KVMLAB_SRC)/arch/x86/kvm" in out
    assert "include $(KVMLAB_SRC)/virt/kvm/Makefile.kvm" in out
    assert "$(srctree)/scripts/foo" in out


# --------------------------------------------------------------------------------------------
# .modinfo, vermagic, load order

@pytest.fixture
def modules(tmp_path):
    if gcc() is None:
        pytest.skip("gcc is not installed on this host")
    d = tmp_path / "mods"
    d.mkdir()
    kvm = make_module_object(d / "kvm.ko", [
        "license=GPL", "srcversion=0123456789ABCDEF0123456", "depends=", "name=kvm",
        f"vermagic={VERMAGIC}", "parm=halt_poll_ns:uint", "parm=ignore_msrs:bool"], tmp_path)
    intel = make_module_object(d / "kvm-intel.ko", [
        "alias=cpu:type:x86,ven*fam*mod*:feature:*0085*", "depends=kvm", "name=kvm_intel",
        f"vermagic={VERMAGIC}"], tmp_path)
    amd = make_module_object(d / "kvm-amd.ko", [
        "depends=kvm", "name=kvm_amd", f"vermagic={VERMAGIC}"], tmp_path)
    return {"kvm": kvm, "intel": intel, "amd": amd}


def test_read_modinfo_from_the_elf_section(modules):
    info = elf.read_modinfo(modules["kvm"])
    assert info["vermagic"] == VERMAGIC
    assert info["srcversion"] == "0123456789ABCDEF0123456"
    assert info["depends"] == ""
    assert info["parm"] == ["halt_poll_ns:uint", "ignore_msrs:bool"]
    assert elf.read_modinfo(modules["intel"])["depends"] == "kvm"


def test_read_modinfo_matches_the_modinfo_program(modules):
    if shutil.which("modinfo") is None and not Path("/usr/sbin/modinfo").exists():
        pytest.skip("modinfo (kmod) is not installed")
    prog = shutil.which("modinfo") or "/usr/sbin/modinfo"
    for p in modules.values():
        out = subprocess.run([prog, "-F", "vermagic", str(p)], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == elf.read_modinfo(p)["vermagic"].strip()


def test_read_modinfo_xz_and_errors(modules, tmp_path):
    xz = tmp_path / "kvm.ko.xz"
    xz.write_bytes(lzma.compress(modules["kvm"].read_bytes(), format=lzma.FORMAT_XZ))
    assert elf.read_modinfo(xz)["vermagic"] == VERMAGIC
    junk = tmp_path / "junk.ko"
    junk.write_text("not a module\n")
    with pytest.raises(elf.ModinfoError, match="not an ELF"):
        elf.read_modinfo(junk)
    with pytest.raises(elf.ModinfoError, match="not found"):
        elf.read_modinfo(tmp_path / "missing.ko")
    plain = tmp_path / "plain.o"
    (tmp_path / "plain.c").write_text("int y;\n")
    assert cc(["-c", "plain.c", "-o", "plain.o"], tmp_path).returncode == 0
    with pytest.raises(elf.ModinfoError, match="no .modinfo"):
        elf.read_modinfo(plain)


def test_check_vermagic_refuses_another_kernel_before_insmod(modules):
    assert kmodules.check_vermagic(modules["kvm"], REL)["vermagic"] == VERMAGIC
    with pytest.raises(kmodules.VermagicMismatch) as e:
        kmodules.check_vermagic(modules["intel"], "6.18.0-kvmlab")
    assert isinstance(e.value, HostError)
    assert REL in e.value.message and "6.18.0-kvmlab" in e.value.message
    assert VERMAGIC.strip() in e.value.message and "nothing was loaded" in e.value.message


def test_load_order_puts_dependencies_first(modules):
    order = kmodules.load_order([modules["amd"], modules["intel"], modules["kvm"]])
    assert [p.name for p in order] == ["kvm.ko", "kvm-amd.ko", "kvm-intel.ko"]
    assert [p.name for p in kmodules.load_order([modules["intel"]])] == ["kvm-intel.ko"]


def test_modules_from_a_kmod_output_dir(modules, tmp_path):
    out = modules["kvm"].parent
    arts = [{"path": p.name, "sha256": kmodules.sha256_file(p), "size": p.stat().st_size}
            for p in (modules["intel"], modules["kvm"])]
    (out / "manifest.json").write_text(json.dumps({"kind": "kmod", "artifacts": arts}))
    assert [p.name for p in kmodules.modules_from(out)] == ["kvm.ko", "kvm-intel.ko"]
    modules["kvm"].write_bytes(modules["kvm"].read_bytes() + b"\0")
    with pytest.raises(HostError, match="differs from the sha256"):
        kmodules.modules_from(out)
    with pytest.raises(HostError, match="no manifest.json"):
        kmodules.modules_from(tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------
# recipes

def test_both_kmod_recipes_validate():
    r = load_recipe(REPO / "recipes", "kvm-kmod-6.1")
    s = kmodspec.kmod_spec(r)
    assert s.kernel_release == REL and s.headers.endswith(REL)
    assert r.builder("debian12").image == "debian12-kmod"
    el6 = kmodspec.kmod_spec(load_recipe(REPO / "recipes", "kvm-kmod-2.6.32-el6"))
    assert el6.source == "fetch" and el6.kernel_release == "2.6.32-754.el6.x86_64"


def test_the_6_1_image_pins_what_the_recipe_says():
    r = load_recipe(REPO / "recipes", "kvm-kmod-6.1")
    s = kmodspec.kmod_spec(r)
    df = (REPO / "docker" / r.builder("debian12").image / "Dockerfile").read_text()
    assert f"ARG LINUX_VERSION={s.package_version}\n" in df
    assert f"ARG LINUX_ABI={REL.rsplit('-', 1)[0]}\n" in df


def test_debug_vmx_series_is_conditional_and_linted(kvmlab_env):
    from kvmlab.source.patch import read_series
    r = load_recipe(REPO / "recipes", "kvm-kmod-6.1")
    entries = read_series(REPO / "patches", r, "debian12")
    assert [(e.name, e.condition, e.active) for e in entries] == [
        ("debug-vmx-enable.patch", "debug-vmx", False),
        ("debug-vmx-entry.patch", "debug-vmx", False)]
    for e in entries:
        head = e.path.read_text().split("\n--- ")[0]
        for field in ("Subject:", "For:", "Failing-log:", "Upstream:"):
            assert field in head, (e.name, field)


def test_kmod_table_errors_name_the_key(tmp_path):
    text = (REPO / "recipes/kvm-kmod-6.1.toml").read_text()
    bad = tmp_path / "kvm-kmod-6.1.toml"
    bad.write_text(text.replace('module_dir = "arch/x86/kvm"', 'module_dir = "../etc"'))
    with pytest.raises(RecipeError, match="kmod.module_dir"):
        kmodspec.kmod_spec(parse_recipe(bad))
    bad.write_text(text.replace('kernel_release = "6.1.0-50-amd64"', 'kernel_relase = "x"'))
    with pytest.raises(RecipeError, match="unknown key 'kmod.kernel_relase'"):
        kmodspec.kmod_spec(parse_recipe(bad))


def test_el6_recipe_stops_at_fetch_before_touching_docker(kvmlab_env, monkeypatch):
    # offline: no traffic to the CentOS vault from tests; the SRPM is not cached here
    from kvmlab.core.errors import FetchError
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(FetchError, match="offline"):
        kmodbuild.build_kmod(kvmlab_env, "kvm-kmod-2.6.32-el6", "centos6", offline=True)
    with pytest.raises(BuildError, match="native"):
        kmodbuild.build_kmod(kvmlab_env, "kvm-kmod-6.1", "native")
    with pytest.raises(BuildError, match="--source does not apply"):
        kmodbuild.build_kmod(kvmlab_env, "kvm-kmod-6.1", "debian12", source="/tmp")


def test_extract_lines_for_tarball_tree_and_srpm():
    spec = kmodspec.kmod_spec(load_recipe(REPO / "recipes", "kvm-kmod-2.6.32-el6"))
    srpm = " ".join(kmodbuild._extract_lines(spec, 1, None))
    assert "rpm2cpio \"$S\" | cpio -i --quiet --to-stdout linux-2.6.32-754.el6.tar.bz2" in srpm
    assert "--strip-components=1 '*/arch/x86/kvm' '*/virt/kvm' -f .kvmlab-kernel.tar" in srpm
