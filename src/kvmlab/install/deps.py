"""The build's runtime libraries on this host: what the loader finds (ldconfig view), which
Debian packages are missing, and installing them with apt-get (--install-deps).

The build records one ``runtime_deps`` entry per DT_NEEDED soname (kvmlab.build.qemu); install
checks them here before anything is copied.
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

from kvmlab.core import proc
from kvmlab.core.errors import InstallError, KvmlabError
from kvmlab.core.settings import Settings
from kvmlab.model.manifests import BuildManifest, RuntimeDep
from kvmlab.model.recipe import Recipe

APT_TIMEOUT = float(os.environ.get("KVMLAB_APT_TIMEOUT", "900"))
APT_INSTALL = ["apt-get", "install", "-y", "--no-install-recommends"]


# ---------------------------------------------------------------------------------------------
# what the dynamic loader finds here
def _loader_dirs() -> list[str]:
    """The directories the dynamic loader searches without ld.so.cache (Debian multiarch)."""
    m = platform.machine()
    return [f"/lib/{m}-linux-gnu", f"/usr/lib/{m}-linux-gnu", "/lib64", "/usr/lib64", "/lib",
            "/usr/lib"]


def parse_ldconfig(text: str, machine: str | None = None) -> set[str]:
    """Sonames in `ldconfig -p` output, for this machine's word size (x86-64 entries on
    x86_64: an i386 libfoo.so.1 does not satisfy a 64-bit binary)."""
    machine = machine or platform.machine()
    want = {"x86_64": "x86-64", "aarch64": "AArch64"}.get(machine)
    out = set()
    for line in text.splitlines():
        m = re.match(r"^\s+(\S+)\s+\(([^)]*)\)\s+=>\s+/", line)
        if m and (want is None or want in m.group(2)):
            out.add(m.group(1))
    return out


def host_sonames(wanted: Iterable[str]) -> set[str] | None:
    """Which of wanted the dynamic loader finds on this host: ld.so.cache (`ldconfig -p`) or a
    file in its default directories. None: no ldconfig here (cannot tell)."""
    ldconfig = next((p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig") if os.path.exists(p)),
                    None)
    if ldconfig is None:
        return None
    try:
        r = proc.run([ldconfig, "-p"], timeout=30)
    except (OSError, KvmlabError):
        return None
    have = parse_ldconfig(r.stdout)
    return {so for so in wanted
            if so in have or any(os.path.exists(os.path.join(d, so)) for d in _loader_dirs())}


def missing_runtime_deps(bm: BuildManifest) -> list[RuntimeDep] | None:
    """The build's runtime_deps entries whose soname this host lacks; None when the build
    manifest records none (built by an older kvmlab) or the host cannot be asked."""
    if bm.runtime_deps is None:
        return None
    deps = [d for d in bm.runtime_deps if d.soname]
    found = host_sonames(d.soname for d in deps)
    if found is None:
        return None
    return [d for d in deps if d.soname not in found]


# ---------------------------------------------------------------------------------------------
# apt-get
def apt_command(packages: Iterable[str]) -> list[str]:
    return APT_INSTALL + sorted(set(packages))


def _apt_line(packages: Iterable[str]) -> str:
    return ("" if os.geteuid() == 0 else "sudo ") + " ".join(apt_command(packages))


def _describe_missing(missing: list[RuntimeDep]) -> str:
    return ", ".join(f"{d.soname} ({d.runtime_package})" if d.runtime_package else
                     f"{d.soname} (no Debian package known; builder's: "
                     f"{d.builder_package or 'none'})" for d in missing)


def _run_logged(cmd: list[str], log: Path, timeout: float) -> tuple[int, str]:
    """Run cmd, its output streamed to the terminal and appended to log; (exit code, last
    line). The whole process group is killed after timeout."""
    log.parent.mkdir(parents=True, exist_ok=True)
    last = [""]
    with open(log, "a", encoding="utf-8", errors="replace") as f:
        f.write("+ " + " ".join(cmd) + "\n")
        f.flush()

        def line(text: str) -> None:
            f.write(text)
            f.flush()
            sys.stdout.write(text)
            sys.stdout.flush()
            last[0] = text.strip() or last[0]
        try:
            rc = proc.stream(cmd, timeout=timeout, on_line=line,
                             env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        except proc.CommandTimeout:
            raise InstallError(f"`{' '.join(cmd)}` timed out after {timeout:.0f} s and was "
                               "stopped", hint=f"set KVMLAB_APT_TIMEOUT (seconds); its output: "
                                               f"{log}") from None
    return rc, last[0]


def _apt_install(settings: Settings, packages: list[str], timeout: float) -> None:
    if os.geteuid() != 0:
        raise InstallError("--install-deps runs apt-get, which needs root; nothing was "
                           "installed", hint=f"run `{_apt_line(packages)}` first, or run "
                                             "install with sudo")
    if shutil.which("apt-get") is None:
        raise InstallError("--install-deps needs apt-get, and this host has none; nothing was "
                           "installed", hint="install the packages that provide the missing "
                                             "libraries with this host's package manager")
    log = settings.work_dir / "install-deps.log"
    lists = Path("/var/lib/apt/lists")
    if not any(lists.glob("*_Packages*")):     # trimmed lists (minimal images): fetch them
        rc, last = _run_logged(["apt-get", "update"], log, timeout)
        if rc != 0:
            raise InstallError(f"`apt-get update` failed (exit {rc}): {last}; nothing was "
                               "installed", hint=f"check the apt sources; its output: {log}")
    cmd = apt_command(packages)
    rc, last = _run_logged(cmd, log, timeout)
    if rc != 0:
        raise InstallError(f"`{' '.join(cmd)}` failed (exit {rc}): {last}; nothing was "
                           "installed", hint=f"its output: {log}")


# ---------------------------------------------------------------------------------------------
# the check install runs first
def _refusal(recipe: Recipe, builder: str, missing: list[RuntimeDep], what: str,
             known: list[str], install_deps: bool) -> InstallError:
    unknown = [d.soname for d in missing if not d.runtime_package]
    hint_parts = []
    if known:
        hint_parts.append(f"`{_apt_line(known)}`" + ("" if install_deps else
                                                       " (or run install with --install-deps)"))
    if unknown:
        hint_parts.append("find a package for " + ", ".join(unknown) + " with "
                          "`apt-file search SONAME`")
    return InstallError(f"this host lacks {what} that the build of {recipe.name}/{builder} "
                        f"needs: {_describe_missing(missing)}; nothing was installed",
                        hint="; ".join(hint_parts))


def ensure_runtime_deps(settings: Settings, recipe: Recipe, builder: str, bm: BuildManifest, *,
                        install_deps: bool, dry_run: bool, warnings: list[str]) -> list[str]:
    """Check the build's runtime libraries on this host before anything is copied: refuse with
    the apt-get line, or (install_deps) install the packages. Returns the packages installed."""
    missing = missing_runtime_deps(bm)
    if missing is None:
        if bm.runtime_deps is None:
            warnings.append(f"the build of {recipe.name}/{builder} records no runtime "
                            "dependencies (built by an older kvmlab): libraries not checked; "
                            f"`invoke build --recipe {recipe.name} --builder {builder} --force` "
                            "records them")
        else:
            warnings.append("no ldconfig on this host: runtime libraries not checked")
        return []
    if not missing:
        return []
    known = sorted({d.runtime_package for d in missing if d.runtime_package})
    n = len(missing)
    what = f"{n} shared librar{'y' if n == 1 else 'ies'}"
    if dry_run:
        warnings.append(f"this host lacks {what} the binaries need: {_describe_missing(missing)}"
                        + (f"; `{_apt_line(known)}` installs them" if known else ""))
        return []
    if not install_deps or any(not d.runtime_package for d in missing):
        raise _refusal(recipe, builder, missing, what, known, install_deps)
    _apt_install(settings, known, APT_TIMEOUT)
    still = missing_runtime_deps(bm) or []
    if still:
        raise InstallError(f"apt-get installed {', '.join(known)}, but this host still lacks "
                           f"{_describe_missing(still)}; nothing was installed",
                           hint=f"its output: {settings.work_dir / 'install-deps.log'}")
    return known
