"""The lab VM's root filesystem: one uncompressed newc initramfs, booted with ``rdinit=/init``.

Made of three parts: the filesystem of the docker image ``kvmlab/labvm`` (docker/labvm: the
local Debian base + python3, openssh-server, kmod, iproute2, strace and the ARG-given extra
packages), exported through the docker SDK; the closure of the kernel modules the lab VM needs
(``NEEDED_MODULES`` and what modules.dep says they depend on, with their own depmod files); and
``/init`` (kvmlab/nested/init.sh). ``extra`` adds files (guest path -> host path). The archive
is cached under ``CACHE/nested/rootfs/`` by the hash of all its inputs (a Stamp): an unchanged
rootfs is not rebuilt.
"""
from __future__ import annotations

import os
import re
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from kvmlab.build import containers, images
from kvmlab.core import proc, ui
from kvmlab.core.errors import KvmlabError
from kvmlab.core.fsutil import json_sha256, sha256_file
from kvmlab.core.settings import Settings
from kvmlab.core.stamps import Stamp
from kvmlab.nested.cpio import CpioWriter
from kvmlab.nested.kernel import Kernel

IMAGE = "labvm"                      # docker/labvm/
NEEDED_MODULES = ("virtio_pci", "virtio_net", "kvm", "kvm_amd", "kvm_intel")
# depmod's inputs besides the .ko files (modules.builtin lets modprobe accept built-ins)
DEPMOD_FILES = ("modules.order", "modules.builtin", "modules.builtin.modinfo")
SKIP = {".dockerenv", "init"}        # from the export: docker's marker; /init is ours
DEPMOD_TIMEOUT = 120
# Bump when the archive's layout or the writer changes.
LAYOUT_VERSION = 1


class RootfsError(KvmlabError):
    """The lab VM's root filesystem cannot be made."""


@dataclass(frozen=True)
class Rootfs:
    path: Path                 # the .cpio (uncompressed newc)
    sha256: str                # of the inputs (the cache key)
    image: str                 # docker image reference it came from
    modules: tuple[str, ...]   # module files included (relative to lib/modules/<release>)
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "sha256": self.sha256, "image": self.image,
                "modules": list(self.modules), "size": self.size}


def module_name(path: str) -> str:
    """kernel/arch/x86/kvm/kvm-amd.ko -> kvm_amd (the name modprobe and lsmod use)."""
    base = path.rsplit("/", 1)[-1]
    return re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base).replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """modules.dep -> {module name: (its path, the paths it depends on)}."""
    out: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        path, sep, deps = line.partition(":")
        if sep and path.strip():
            out[module_name(path.strip())] = (path.strip(), deps.split())
    return out


def module_closure(dep_text: str, names: Iterable[str]) -> list[str]:
    """The paths of the named modules and everything they depend on (sorted); a name that
    modules.dep does not list is a RootfsError (built-in modules are not in modules.dep)."""
    deps = parse_modules_dep(dep_text)
    by_path = {p: d for p, d in deps.values()}
    seen: set[str] = set()
    todo = []
    for n in names:
        key = n.replace("-", "_")
        if key not in deps:
            raise RootfsError(f"module {n} is not in this kernel's modules.dep",
                              hint="the kernel must build it as a module (=m)")
        todo.append(deps[key][0])
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo.extend(by_path.get(p, []))
    return sorted(seen)


def init_script() -> bytes:
    return resources.files("kvmlab.nested").joinpath("init.sh").read_bytes()


def _stage_modules(kernel: Kernel, dest: Path) -> list[str]:
    """Copy the module closure + depmod inputs to dest/lib/modules/<release> and depmod it."""
    closure = module_closure((kernel.modules_dir / "modules.dep").read_text(), NEEDED_MODULES)
    mdir = dest / "lib" / "modules" / kernel.release
    for rel in closure:
        (mdir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(kernel.modules_dir / rel, mdir / rel)
    for f in DEPMOD_FILES:
        if (kernel.modules_dir / f).is_file():
            shutil.copy2(kernel.modules_dir / f, mdir / f)
    proc.run(["depmod", "-b", dest, kernel.release], timeout=DEPMOD_TIMEOUT, check=True,
             what=f"depmod of the lab VM's modules ({kernel.release})")
    return closure


def _add_tree(w: CpioWriter, root: Path, prefix: str = "") -> None:
    """Add every directory and file under root (as <prefix><relative path>), parents first."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for n in sorted(dirnames) + sorted(filenames):
            p = Path(dirpath) / n
            rel = prefix + p.relative_to(root).as_posix()
            if rel in w.names:
                continue
            st = p.lstat()
            if p.is_dir():
                w.add_dir(rel, st.st_mode & 0o7777, int(st.st_mtime))
            else:
                with open(p, "rb") as f:
                    w.add_stream(rel, f, st.st_size, st.st_mode & 0o7777, mtime=int(st.st_mtime))


def _add_parents(w: CpioWriter, rel: str) -> None:
    parts = rel.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        d = "/".join(parts[:i])
        if d not in w.names:
            w.add_dir(d)


def write_rootfs(out: Path, fs_tar: Path, modules_root: Path, init: bytes,
                 extra: Mapping[str, Path]) -> None:
    """The cpio at ``out``: the exported filesystem, the staged modules, extra files, /init."""
    extra_rel = {g.strip("/"): Path(h) for g, h in extra.items()}
    merged_usr = False         # Debian 12: /lib -> usr/lib (the modules go to usr/lib/modules)
    with open(out, "wb") as f, tarfile.open(fs_tar) as tar:
        w = CpioWriter(f)
        for m in tar:
            name = m.name.strip("/").removeprefix("./")
            if not name or name in SKIP or name in extra_rel:
                continue
            merged_usr = merged_usr or (name == "lib" and m.issym())
            w.add_tar_member(tar, m, name)
        _add_tree(w, modules_root, "usr/" if merged_usr else "")
        for rel, host in sorted(extra_rel.items()):
            _add_parents(w, rel)
            st = host.stat()
            with open(host, "rb") as src:
                w.add_stream(rel, src, st.st_size, st.st_mode & 0o7777)
        w.add_file("init", init, 0o755)
        w.close()


def _inputs(image: images.ImageInfo, kernel: Kernel, init: bytes,
            extra: Mapping[str, Path]) -> dict[str, Any]:
    return {"layout": LAYOUT_VERSION, "image": image.id, "kernel": kernel.release,
            "kernel_package": kernel.package_version, "modules": list(NEEDED_MODULES),
            "init": json_sha256(init.decode(errors="replace")),
            "extra": {g: sha256_file(Path(h)) for g, h in sorted(extra.items())}}


def build_rootfs(settings: Settings, kernel: Kernel, *, extra_packages: Iterable[str] = (),
                 extra: Mapping[str, Path] | None = None, init: bytes | None = None,
                 force: bool = False, quiet: bool = True) -> Rootfs:
    """The lab VM's initramfs for ``kernel`` (made when its inputs changed). ``init``: another
    /init (tests); ``extra_packages``: apt packages added to the image."""
    extra = dict(extra or {})
    init = init if init is not None else init_script()
    pkgs = " ".join(sorted(set(extra_packages)))
    client = images.docker_client()
    image = images.ensure_image(settings, IMAGE, client=client, quiet=quiet,
                                buildargs={"EXTRA_PACKAGES": pkgs} if pkgs else None)
    inputs = _inputs(image, kernel, init, extra)
    key = json_sha256(inputs)[:16]
    base = settings.cache / "nested" / "rootfs"
    out = base / f"labvm-{kernel.release}-{key}.cpio"
    stamp = Stamp(out.with_suffix(".stamp.json"), "nested-rootfs")
    rec = stamp.fresh(inputs)
    if rec and not force and out.is_file():
        return Rootfs(out, key, image.ref, tuple(rec["modules"]), out.stat().st_size)
    base.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=".labvm-", dir=base) as tmp:
        t = Path(tmp)
        fs_tar = t / "fs.tar"
        containers.export_image_fs(client, image.ref, fs_tar,
                                   name=containers.container_name("labvm-export"))
        closure = _stage_modules(kernel, t / "modules")
        part = t / "rootfs.cpio"
        write_rootfs(part, fs_tar, t / "modules", init, extra)
        os.replace(part, out)
    rootfs = Rootfs(out, key, image.ref, tuple(closure), out.stat().st_size)
    stamp.write(inputs, rootfs.to_json())
    ui.info(f"lab VM rootfs {out} ({rootfs.size >> 20} MiB, {len(closure)} modules) in "
            f"{time.monotonic() - t0:.1f} s")
    return rootfs
