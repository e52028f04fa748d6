"""The load-modules side of a kmod build: which .ko files, in which order, for which kernel.

``modules_from`` (the .ko files a kmod build's manifest lists, checked against their sha256),
``load_order`` (dependencies first: kvm before kvm-intel/kvm-amd), ``check_vermagic`` (refuse a
module built for another kernel before any insmod) and ``external_depends`` (modules that must
come from the running kernel first). The .modinfo strings come from kvmlab.core.elf.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kvmlab.build.layout import MANIFEST
from kvmlab.core.elf import ModinfoError, read_modinfo
from kvmlab.core.errors import HostError
from kvmlab.core.fsutil import read_json, sha256_file


class VermagicMismatch(HostError):
    """A module was built for another kernel than the one it would be loaded into."""


def external_depends(paths: Iterable[Path | str]) -> list[str]:
    """Modules the given .ko files depend on but do not include (e.g. Debian 6.1's kvm needs
    irqbypass, kvm_amd needs ccp): they must come from the running kernel (modprobe) first."""
    infos = {Path(p): read_modinfo(p) for p in paths}
    have = {module_name(p, i) for p, i in infos.items()}
    out: list[str] = []
    for i in infos.values():
        out += [d for d in _depends(i) if d not in have and d not in out]
    return out


def module_name(ko_path: Path | str, info: dict[str, Any] | None = None) -> str:
    """The module's name as the kernel sees it (kvm_intel for kvm-intel.ko)."""
    if info and isinstance(info.get("name"), str) and info["name"]:
        return info["name"]
    return re.sub(r"\.ko(\.[a-z]+)?$", "", Path(ko_path).name).replace("-", "_")


def _depends(info: dict[str, Any]) -> list[str]:
    d = info.get("depends", "")
    if isinstance(d, list):
        d = ",".join(d)
    return [x.replace("-", "_") for x in d.split(",") if x]


def vermagic_release(vermagic: str) -> str:
    """The kernel release a vermagic string starts with ('6.1.0-50-amd64 SMP ...' -> release)."""
    return vermagic.split()[0] if vermagic.split() else ""


def running_vermagic(release: str, root: Path | str = "/") -> str | None:
    """The vermagic of the running kernel's own modules (from one of its installed modules), or
    None when it has none (no /lib/modules/RELEASE, e.g. a kernel without module support)."""
    base = Path(root) / "lib/modules" / release / "kernel"
    for sub in ("arch/x86/kvm", "virt/lib", "lib", "fs", "drivers"):
        d = base / sub
        if not d.is_dir():
            continue
        for p in sorted(d.rglob("*.ko*")):
            if re.search(r"\.ko(\.xz)?$", p.name):
                try:
                    return read_modinfo(p)["vermagic"]
                except ModinfoError:
                    continue
    return None


def check_vermagic(ko_path: Path | str, release: str | None = None, *,
                   root: Path | str = "/") -> dict[str, Any]:
    """Refuse (VermagicMismatch, a HostError) a module built for another kernel release than
    `release` (default: the running kernel, os.uname().release), before any insmod is tried.
    Returns the module's modinfo when it matches."""
    release = release or os.uname().release
    info = read_modinfo(ko_path)
    vm = info["vermagic"].strip()
    built_for = vermagic_release(vm)
    if built_for != release:
        theirs = running_vermagic(release, root) if release == os.uname().release else None
        target = f"vermagic '{theirs.strip()}'" if theirs else f"release {release}"
        raise VermagicMismatch(
            f"{Path(ko_path).name} was built for kernel {built_for} (vermagic '{vm}') but the "
            f"target kernel is {release} ({target}); insmod would fail with "
            "'Invalid module format', so nothing was loaded",
            hint=f"build the modules against the headers of {release} (a kmod recipe whose "
                 f"[kmod] headers are linux-headers-{release}), or boot kernel {built_for}")
    return info


def load_order(paths: Iterable[Path | str]) -> list[Path]:
    """The .ko files in an order insmod accepts: every module after the modules it depends on
    (modinfo 'depends'; kvm before kvm-intel/kvm-amd), otherwise in the order given."""
    items = [Path(p) for p in paths]
    infos: dict[Path, dict[str, Any]] = {}
    for p in items:
        try:
            infos[p] = read_modinfo(p)
        except ModinfoError:
            infos[p] = {}
    names = {p: module_name(p, infos[p]) for p in items}
    by_name = {n: p for p, n in names.items()}

    def deps(p: Path) -> list[str]:
        d = _depends(infos[p]) if infos[p] else []
        if not infos[p] and names[p] != "kvm" and names[p].startswith("kvm"):
            d = ["kvm"]  # unreadable file: fall back to the known kvm dependency
        return [x for x in d if x in by_name]

    out: list[Path] = []
    state: dict[Path, int] = {}

    def visit(p: Path, chain: list[str]) -> None:
        if state.get(p) == 2:
            return
        if state.get(p) == 1:
            raise HostError("modules depend on each other in a cycle: " +
                            " -> ".join(chain + [names[p]]))
        state[p] = 1
        for d in deps(p):
            visit(by_name[d], chain + [names[p]])
        state[p] = 2
        out.append(p)

    for p in items:
        visit(p, [])
    return out


def modules_from(out_dir: Path | str) -> list[Path]:
    """The .ko files a kmod build put in out_dir (from its manifest.json), in load order; each
    checked against the manifest's sha256 (HostError when missing or changed)."""
    out = Path(out_dir)
    if (out / MANIFEST).is_file():
        m = read_json(out / MANIFEST, {}) or {}
    else:
        raise HostError(f"{out} has no {MANIFEST}: not the output of a kmod build",
                        hint="build one with `invoke build --recipe kvm-kmod-6.1`, or pass the "
                             "module files with --ko")
    if m.get("kind") != "kmod":
        raise HostError(f"{out / MANIFEST} is not a kmod build's manifest (kind "
                        f"{m.get('kind')!r})", hint="pass the out/ dir of a kvm-kmod-* recipe")
    paths = []
    for a in m.get("artifacts", []):
        p = out / a["path"]
        if not p.is_file():
            raise HostError(f"{p} is listed in {out / MANIFEST} but missing",
                            hint="rebuild with `invoke build --force`")
        if sha256_file(p) != a["sha256"]:
            raise HostError(f"{p} differs from the sha256 in {out / MANIFEST}",
                            hint="rebuild with `invoke build --force`")
        paths.append(p)
    return load_order(paths)
