"""testinfra checks for install / install-bios: what the install manifest says is really there.

Which manifests: KVMLAB_VERIFY_INSTALL_MANIFEST (set by the install tasks) or every manifest
under <state_dir>/installs/ (``invoke verify --step install``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kvmlab.install.firmware import find_search_dirs


@pytest.fixture(scope="module")
def manifests(kvmlab_settings, verify_env):
    if verify_env.get("install_manifest"):
        paths = [Path(verify_env["install_manifest"])]
    else:
        paths = sorted((kvmlab_settings.state_dir / "installs").glob("*.json"))
    out = []
    for p in paths:
        out.append((p, json.loads(p.read_text())))
    if not out:
        pytest.skip(f"nothing installed by kvmlab (no manifest in "
                    f"{kvmlab_settings.state_dir / 'installs'})")
    return out


def test_installed_files_match_manifest(host, manifests):
    bad = []
    for _mpath, m in manifests:
        for e in m["files"]:
            f = host.file(e["path"])
            if e.get("type") == "symlink":
                if not f.is_symlink:
                    bad.append(f"{e['path']}: not a symlink")
                elif f.linked_to != os.path.realpath(e["target"]):
                    bad.append(f"{e['path']}: links to {f.linked_to}, not {e['target']}")
                continue
            if not f.exists:
                bad.append(f"{e['path']}: missing")
                continue
            if f.is_symlink or not f.is_file:
                bad.append(f"{e['path']}: not a regular file")
                continue
            if f.sha256sum != e["sha256"]:
                bad.append(f"{e['path']}: sha256 {f.sha256sum[:16]}, manifest {e['sha256'][:16]}")
            if f.mode != int(e["mode"], 8):
                bad.append(f"{e['path']}: mode {f.mode:04o}, manifest {e['mode']}")
            if f.uid != e["uid"] or f.gid != e["gid"]:
                bad.append(f"{e['path']}: owner {f.uid}:{f.gid}, manifest {e['uid']}:{e['gid']}")
    assert not bad, "; ".join(bad[:10])


def _binaries(manifests):
    for _p, m in manifests:
        for e in m["files"]:
            if e.get("kind") == "binary":
                yield m, e


def test_qemu_binaries_answer_version(host, manifests):
    qemus = [(m, e) for m, e in _binaries(manifests)
             if os.path.basename(e["path"]).startswith("qemu-system") or
             e.get("name", "").startswith("qemu-system")]
    if not qemus:
        pytest.skip("no qemu-system binary installed")
    for _m, e in qemus:
        r = host.run(f"{e['path']} -version")
        assert r.rc == 0 and "QEMU" in r.stdout, f"{e['path']} -version: {r.stderr.strip()}"


def _recorded_packages(m):
    """soname -> Debian package, from the build manifest of the last install in m."""
    for inst in reversed(m.get("installs") or []):
        try:
            bm = json.loads((Path(inst["build_out"]) / "manifest.json").read_text())
        except (OSError, ValueError, KeyError):
            continue
        return {d["soname"]: d.get("runtime_package") for d in bm.get("runtime_deps") or []
                if isinstance(d, dict) and d.get("soname")}
    return {}


def test_installed_binaries_find_their_libraries(host, manifests):
    bad = []
    for m, e in _binaries(manifests):
        if e.get("type") == "symlink" or not host.file(e["path"]).exists:
            continue
        r = host.run("ldd %s", e["path"])
        missing = [ln.split()[0] for ln in r.stdout.splitlines() if "not found" in ln]
        if missing:
            pk = _recorded_packages(m)
            named = [f"{so} (package {pk[so]})" if pk.get(so) else f"{so} (package unknown)"
                     for so in missing]
            pkgs = sorted({pk[so] for so in missing if pk.get(so)})
            bad.append(f"{e['path']}: unresolved libraries: {', '.join(named)}" +
                       (f"; fix: apt-get install -y --no-install-recommends {' '.join(pkgs)}"
                        if pkgs else ""))
    assert not bad, "; ".join(bad)


def test_binaries_on_path(host, manifests):
    path_dirs = host.environment().get("PATH", "").split(":")
    checked = 0
    for m, e in _binaries(manifests):
        d = os.path.dirname(e["path"])
        if m.get("destdir") or d not in path_dirs:
            continue
        name = os.path.basename(e["path"])
        found = host.check_output(f"command -v {name} || true")
        earlier = path_dirs[:path_dirs.index(d)]
        if not found:
            pytest.fail(f"{name} is not found on PATH")
        if found != e["path"] and os.path.dirname(found) in earlier:
            pytest.fail(f"{name} on PATH is {found} (earlier in PATH), not {e['path']}")
        checked += 1
    if not checked:
        pytest.skip("not installed into a PATH prefix (or with DESTDIR)")


def test_firmware_in_every_search_dir(host, manifests, recipe):
    checked = 0
    bad = []
    for _p, m in manifests:
        bios = m.get("bios")
        if not bios:
            continue
        dirs = list(bios.get("search_dirs", [])) + list(bios.get("compat_dirs", []))
        if host.backend.NAME == "local" and os.path.exists(bios["qemu"]):
            # ask the binary again: its search path may have changed since (with the data dir
            # name of the recipe's layout: RHEL's qemu-kvm looks in share/qemu-kvm)
            ours = any(i.get("recipe") == recipe.name for i in m.get("installs", []))
            suffix = (recipe.install.get("datadir") if ours else None) or "share/qemu"
            now = find_search_dirs(Path(bios["qemu"]), probe=False, share_suffix=suffix)
            dirs += [str(d) for d in now.dirs if str(d) not in dirs]
        names = [n for n in ("bios.bin", "vapic.bin") if n in bios.get("recipe_files", [])] or \
            [n for n in bios.get("files", []) if n.startswith("bios")]
        for d in dirs:
            for n in names:
                checked += 1
                if not host.file(f"{d}/{n}").exists:
                    bad.append(f"{d}/{n}")
    if not checked:
        pytest.skip("install-bios has not run for these installs")
    assert not bad, "missing in a directory the binary searches: " + ", ".join(bad)
