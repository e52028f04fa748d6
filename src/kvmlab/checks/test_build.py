"""testinfra checks for the build step: out/<recipe>/<builder>/ holds working artifacts.

Run by `invoke build` at its end and by `invoke verify --step build [--hosts ...]`.
"""
from __future__ import annotations

import json
import re

import pytest


@pytest.fixture(scope="module")
def out_dir(kvmlab_settings, recipe, builder):
    return kvmlab_settings.out(recipe.name, builder)


@pytest.fixture(scope="module")
def manifest(host, out_dir):
    f = host.file(str(out_dir / "manifest.json"))
    if not f.exists:
        pytest.fail(f"no build output: {f.path} is missing (run `invoke build`)")
    return json.loads(f.content_string)


def _paths(manifest, kind=None):
    return [a for a in manifest["artifacts"] if kind is None or a["kind"] == kind]


def test_manifest_describes_the_build(manifest, recipe, builder):
    assert manifest["recipe"] == recipe.name
    assert manifest["builder"] == builder
    assert re.fullmatch(r"[0-9a-f]{64}", manifest["source_sha256"])
    assert manifest["compiler"], "compiler version not recorded"
    assert manifest["config"]["datadir"], "CONFIG_QEMU_SHAREDIR not found in the build tree"
    if builder != "native":
        assert manifest["image_id"].startswith("sha256:")


def test_every_recipe_binary_is_there(host, manifest, out_dir, recipe):
    for rel in recipe.artifacts["binaries"]:
        f = host.file(str(out_dir / "bin" / rel.rsplit("/", 1)[-1]))
        assert f.is_file, f"{f.path} missing"
        assert f.mode & 0o111, f"{f.path} is not executable"


def test_artifacts_match_manifest_sha256(host, manifest, out_dir):
    assert manifest["artifacts"], "manifest lists no artifacts"
    for a in manifest["artifacts"]:
        f = host.file(str(out_dir / a["path"]))
        assert f.is_file, f"{f.path} missing"
        assert f.sha256sum == a["sha256"], f"{f.path}: sha256 differs from the manifest"
        assert f.size == a["size"]


def test_binaries_are_x86_64_elf(host, manifest, out_dir):
    for a in _paths(manifest, "binary"):
        path = str(out_dir / a["path"])
        hdr = host.check_output("readelf -h %s", path)
        assert re.search(r"Class:\s+ELF64", hdr), f"{path}: not ELF64"
        assert re.search(r"Machine:\s+Advanced Micro Devices X86-64", hdr), f"{path}: not x86-64"
        assert re.search(r"Type:\s+(EXEC|DYN)", hdr), f"{path}: not an executable"
        desc = host.check_output("file -b %s", path) if host.exists("file") else "ELF 64-bit x86-64"
        assert "ELF 64-bit" in desc and "x86-64" in desc, f"{path}: {desc}"


def _packages(manifest):
    """soname -> the Debian package the build recorded for it (None: unknown)."""
    return {d["soname"]: d.get("runtime_package") for d in manifest.get("runtime_deps") or []
            if isinstance(d, dict) and d.get("soname")}


def missing_libraries_message(path, sonames, packages):
    """One line: each missing soname with its package, and the apt-get line that installs
    them."""
    named = [f"{so} (package {packages[so]})" if packages.get(so) else
             f"{so} (package unknown; `invoke build --force` records it)" for so in sonames]
    pkgs = sorted({packages[so] for so in sonames if packages.get(so)})
    fix = f"; fix: apt-get install -y --no-install-recommends {' '.join(pkgs)}" if pkgs else ""
    return f"{path}: unresolved libraries: {', '.join(named)}{fix}"


def _unresolved(host, manifest, out_dir):
    """{artifact path: [sonames ldd cannot find on this host]}"""
    out = {}
    for a in _paths(manifest, "binary"):
        path = str(out_dir / a["path"])
        r = host.run("ldd %s", path)
        missing = [ln.split()[0] for ln in r.stdout.splitlines() if "not found" in ln]
        if missing:
            out[path] = missing
    return out


def _skip_if_host_lacks_recorded_libraries(host, manifest, out_dir):
    """The build is fine when every library this host lacks is one the build recorded with its
    package: installing them is the install step's job (it refuses, or --install-deps)."""
    packages = _packages(manifest)
    missing = _unresolved(host, manifest, out_dir)
    sonames = sorted({so for v in missing.values() for so in v})
    if sonames and all(packages.get(so) for so in sonames):
        pkgs = " ".join(sorted({packages[so] for so in sonames}))
        pytest.skip(f"this host lacks the runtime libraries {', '.join(sonames)}; the build "
                    f"recorded their packages ({pkgs}): `invoke install --install-deps` installs "
                    "them")


def test_shared_libraries_resolve(host, manifest, out_dir):
    _skip_if_host_lacks_recorded_libraries(host, manifest, out_dir)
    packages = _packages(manifest)
    bad = [missing_libraries_message(path, missing, packages)
           for path, missing in _unresolved(host, manifest, out_dir).items()]
    assert not bad, "; ".join(bad)


def test_runtime_dependencies_recorded(manifest):
    deps = manifest.get("runtime_deps")
    if deps is None:
        pytest.skip("built by an older kvmlab: no runtime_deps in the manifest "
                    "(`invoke build --force` records them)")
    unresolved = [d["soname"] for d in deps if not d.get("builder_path")]
    assert not unresolved, f"not found in the builder, where the binaries were linked: {unresolved}"
    unowned = [f"{d['soname']} ({d['builder_path']})" for d in deps
               if not d.get("builder_package")]
    assert not unowned, f"no builder package owns: {unowned}"
    arts = {a["path"] for a in manifest["artifacts"]}
    for d in deps:
        assert set(d["needed_by"]) <= arts, f"{d['soname']}: needed_by names unknown artifacts"


def test_emulator_prints_its_version(host, manifest, out_dir):
    _skip_if_host_lacks_recorded_libraries(host, manifest, out_dir)
    r = host.run("%s -version", str(out_dir / "bin" / "qemu-system-x86_64"))
    assert r.rc == 0, r.stderr
    assert re.search(r"QEMU PC emulator version \d+\.\d+", r.stdout), r.stdout


def test_qemu_img_prints_its_version(host, manifest, out_dir):
    _skip_if_host_lacks_recorded_libraries(host, manifest, out_dir)
    # 0.12's qemu-img has no --version: its help text starts with the version (exit 0 or 1).
    r = host.run("%s -h", str(out_dir / "bin" / "qemu-img"))
    assert r.rc in (0, 1), r.stderr
    assert re.search(r"qemu-img version \d+\.\d+", r.stdout), r.stdout + r.stderr
