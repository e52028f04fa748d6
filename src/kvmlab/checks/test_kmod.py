"""testinfra checks for kvm kernel modules built by a kind = "kmod" recipe (kvmlab.build.kmod).

out/<recipe>/<builder>/ (or KVMLAB_VERIFY_KMOD_DIR, where the modules were copied to on the
target) holds kvm.ko, kvm-intel.ko, kvm-amd.ko and manifest.json. Run by `invoke build --recipe
kvm-kmod-...` at its end and by `invoke verify --step kmod [--hosts ...]`.
"""
from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def kmod_recipe(recipe):
    if recipe.kind != "kmod":
        pytest.skip(f"recipe {recipe.name} is a {recipe.kind} recipe, not kmod")
    return recipe


@pytest.fixture(scope="module")
def out_dir(kvmlab_settings, kmod_recipe, builder, verify_env):
    return verify_env.get("kmod_dir") or str(kvmlab_settings.out(kmod_recipe.name, builder))


@pytest.fixture(scope="module")
def manifest(host, out_dir):
    f = host.file(f"{out_dir}/manifest.json")
    if not f.exists:
        pytest.fail(f"no module build output: {f.path} is missing (run `invoke build`)")
    m = json.loads(f.content_string)
    assert m.get("kind") == "kmod", f"{f.path} is not a kmod build's manifest"
    return m


def test_every_module_file_is_there(host, kmod_recipe, manifest, out_dir):
    names = {a["path"] for a in manifest["artifacts"]}
    for rel in kmod_recipe.artifacts["modules"]:
        base = rel.rsplit("/", 1)[-1]
        assert base in names, f"{base} is not in the manifest"
        f = host.file(f"{out_dir}/{base}")
        assert f.is_file, f"{f.path} missing"
    for a in manifest["artifacts"]:
        f = host.file(f"{out_dir}/{a['path']}")
        assert f.sha256sum == a["sha256"], f"{f.path}: sha256 differs from the manifest"
        assert f.size == a["size"]


def test_modinfo_reads_them(host, manifest, out_dir):
    modinfo = host.find_command("modinfo", extrapaths=("/sbin", "/usr/sbin"))
    for a in manifest["artifacts"]:
        path = f"{out_dir}/{a['path']}"
        out = host.check_output(f"{modinfo} -F vermagic %s", path)
        assert out.strip() == a["vermagic"].strip(), f"{path}: modinfo says vermagic {out!r}"
        assert host.check_output(f"{modinfo} -F srcversion %s", path).strip() == a["srcversion"]
        deps = host.check_output(f"{modinfo} -F depends %s", path).strip()
        assert sorted(d for d in deps.replace("-", "_").split(",") if d) == sorted(a["depends"])


def test_vermagic_is_the_target_kernel(manifest):
    release = manifest["kernel_release"]
    assert manifest["headers"]["release"] == release, \
        f"headers are {manifest['headers']['release']}, the recipe targets {release}"
    for a in manifest["artifacts"]:
        assert a["vermagic"].split()[0] == release, \
            f"{a['path']} has vermagic {a['vermagic']!r}, target kernel {release}"
    names = {a["name"]: a for a in manifest["artifacts"]}
    assert "kvm" in names, "no kvm module in the build"
    assert "kvm" not in names["kvm"]["depends"]
    for vendor in ("kvm_intel", "kvm_amd"):
        if vendor in names:
            assert "kvm" in names[vendor]["depends"], f"{vendor} does not depend on kvm"


def _is_ours(host, a) -> bool:
    """The loaded module NAME is this exact file: same GNU build-id note (or srcversion)."""
    note = host.file(f"/sys/module/{a['name']}/notes/.note.gnu.build-id")
    if a.get("build_id_note") and note.exists:
        return note.content.hex() == a["build_id_note"]
    src = host.file(f"/sys/module/{a['name']}/srcversion")
    return bool(a.get("srcversion")) and src.exists and \
        src.content_string.strip() == a["srcversion"]


def test_loaded_modules_are_live_and_dev_kvm_is_back(host, manifest):
    if not host.file("/proc/modules").exists:
        pytest.skip("this kernel has no loadable-module support (no /proc/modules): the "
                    "modules cannot have been loaded here")
    ours = [a["name"] for a in manifest["artifacts"] if _is_ours(host, a)]
    if not ours:
        pytest.skip("the built modules are not loaded on this host (run `invoke load-modules "
                    "--from <out dir>`)")
    assert "kvm" in ours, "a vendor module of this build is loaded but kvm is not ours"
    vendor = [n for n in ours if n in ("kvm_intel", "kvm_amd")]
    assert vendor, "kvm is loaded from this build but neither kvm_intel nor kvm_amd is"
    for n in vendor:
        assert host.file(f"/sys/module/{n}").is_directory
        assert host.file(f"/sys/module/{n}/initstate").content_string.strip() == "live"
    dev = host.file("/dev/kvm")
    assert dev.exists and dev.is_char_device, "/dev/kvm is missing after loading the modules"
