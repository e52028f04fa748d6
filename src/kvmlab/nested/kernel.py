"""The lab VM's kernel: the Debian ``linux-image-<release>`` package of the kmod recipe's target.

``fetch_kernel(settings, release)`` runs ``apt-get download`` into
``CACHE/nested/kernels/<release>/``, extracts the package (``dpkg-deb -x``), runs ``depmod`` over
its modules and returns a ``Kernel``: vmlinuz, the modules directory (``lib/modules/<release>``)
and the package version. A second call with the same release is a no-op (a Stamp). A release apt
does not know is one clear ``KernelError``. ``recipe_release`` reads ``[kmod] kernel_release``
of a kmod recipe, so the lab VM boots the kernel the modules we build are for (same vermagic).
"""
from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvmlab.build.kmodspec import kmod_spec
from kvmlab.core import proc
from kvmlab.core.errors import KvmlabError
from kvmlab.core.fsutil import replace_dir
from kvmlab.core.settings import Settings
from kvmlab.core.stamps import Stamp
from kvmlab.model.recipe import load_recipe

DEFAULT_KMOD_RECIPE = "kvm-kmod-6.1"
APT_TIMEOUT = 600
EXTRACT_TIMEOUT = 300
DEPMOD_TIMEOUT = 300
# Bump when the way the cache is made changes.
LAYOUT_VERSION = 1


class KernelError(KvmlabError):
    """The lab VM's kernel cannot be fetched or is incomplete."""


@dataclass(frozen=True)
class Kernel:
    release: str            # e.g. 6.1.0-50-amd64 (uname -r, the modules' vermagic)
    vmlinuz: Path
    modules_dir: Path       # .../lib/modules/<release> (with modules.dep)
    package_version: str    # e.g. 6.1.176-1

    def to_json(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}


def recipe_release(settings: Settings, recipe: str = DEFAULT_KMOD_RECIPE) -> str:
    """``[kmod] kernel_release`` of a kmod recipe (RecipeError when it is not one)."""
    return kmod_spec(load_recipe(settings.recipes_dir, recipe)).kernel_release


def kernels_dir(settings: Settings) -> Path:
    return settings.cache / "nested" / "kernels"


def _check_release(release: str) -> None:
    if not re.fullmatch(r"[0-9][\w.+-]*", release):
        raise KernelError(f"{release!r} is not a kernel release",
                          hint="a release looks like 6.1.0-50-amd64 (uname -r)")


def _from_record(rec: Any) -> Kernel | None:
    try:
        k = Kernel(rec["release"], Path(rec["vmlinuz"]), Path(rec["modules_dir"]),
                   rec["package_version"])
    except (KeyError, TypeError):
        return None
    if k.vmlinuz.is_file() and (k.modules_dir / "modules.dep").is_file():
        return k
    return None


def _no_package(release: str, said: str) -> KernelError:
    return KernelError(
        f"apt has no linux-image-{release}; the kmod recipe targets {release}"
        + (f" (apt-get: {said})" if said else ""),
        hint="update the recipe's pins ([kmod] kernel_release, headers_package) or run "
             "`apt-get update`")


def _download(release: str, into: Path) -> Path:
    """apt-get download linux-image-<release> into ``into``; the .deb."""
    pkg = f"linux-image-{release}"
    cp = proc.run(["apt-get", "download", pkg], timeout=APT_TIMEOUT, cwd=into,
                  what=f"apt-get download {pkg}")
    debs = sorted(into.glob(f"{pkg}_*.deb"))
    if cp.returncode != 0 or not debs:
        said = [ln.strip() for ln in (cp.stderr or cp.stdout or "").splitlines() if ln.strip()]
        raise _no_package(release, said[-1] if said else "")
    return debs[-1]


def _extract(deb: Path, root: Path, release: str) -> str:
    """dpkg-deb -x deb root + depmod; the package version."""
    version = proc.run(["dpkg-deb", "-f", deb, "Version"], timeout=EXTRACT_TIMEOUT,
                       check=True).stdout.strip()
    proc.run(["dpkg-deb", "-x", deb, root], timeout=EXTRACT_TIMEOUT, check=True,
             what=f"dpkg-deb -x {deb.name}")
    if not (root / "boot" / f"vmlinuz-{release}").is_file() or \
            not (root / "lib" / "modules" / release).is_dir():
        raise KernelError(f"{deb.name} holds no boot/vmlinuz-{release} and "
                          f"lib/modules/{release}",
                          hint="the release must be the package's own (uname -r of it)")
    proc.run(["depmod", "-b", root, release], timeout=DEPMOD_TIMEOUT, check=True,
             what=f"depmod {release}")
    return version


def fetch_kernel(settings: Settings, release: str, *, force: bool = False) -> Kernel:
    """The Kernel of ``release`` in the cache, downloaded and prepared when missing."""
    _check_release(release)
    base = kernels_dir(settings) / release
    stamp = Stamp(base.with_name(release + ".stamp.json"), "nested-kernel")
    inputs = {"release": release, "layout": LAYOUT_VERSION}
    if not force:
        k = _from_record(stamp.fresh(inputs))
        if k is not None:
            return k
    base.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{release}-", dir=base.parent) as tmp:
        t = Path(tmp)
        (t / "deb").mkdir()
        deb = _download(release, t / "deb")
        version = _extract(deb, t / "root", release)
        shutil.rmtree(t / "deb")
        replace_dir(t / "root", base)
    k = Kernel(release, base / "boot" / f"vmlinuz-{release}", base / "lib" / "modules" / release,
               version)
    stamp.write(inputs, k.to_json())
    return k
