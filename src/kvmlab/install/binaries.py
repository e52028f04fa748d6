"""install: put the build's binaries under DESTDIR+PREFIX -- copied, symlinked to the build
output, or by the kept build tree's own ``make install`` (in the builder image) -- as one
transaction (kvmlab.install.txn), after the runtime libraries are checked (kvmlab.install.deps).

Input: the build output ``settings.out(recipe, builder)`` (bin/, pc-bios/, manifest.json, made
by kvmlab.build.qemu), read through ``BuildManifest``.
"""
from __future__ import annotations

import io
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmlab.build import containers, images
from kvmlab.core import proc
from kvmlab.core.errors import BuildError, InstallError
from kvmlab.core.fsutil import sha256_file
from kvmlab.core.records import to_jsonable
from kvmlab.core.settings import Settings
from kvmlab.install import deps
from kvmlab.install.probe import FIRMWARE_RE
from kvmlab.install.txn import (
    QEMU_NAME,
    FileRow,
    Item,
    apply,
    now,
    open_manifest,
    recipe_of,
    save_manifest,
    target,
)
from kvmlab.model.manifests import BuildManifest, InstallManifest, InstallTarget, ManifestError
from kvmlab.model.recipe import Recipe

MODES = ("copy", "symlink", "make-install")


@dataclass
class InstallResult:
    prefix: str
    destdir: str
    root: Path                  # DESTDIR + PREFIX
    mode: str
    manifest_path: Path
    rows: list[FileRow]
    noop: bool
    warnings: list[str] = field(default_factory=list)
    deps_installed: list[str] = field(default_factory=list)  # Debian packages --install-deps added

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)


# ---------------------------------------------------------------------------------------------
# the build output
def load_build(settings: Settings, recipe: Recipe, builder: str) -> tuple[Path, BuildManifest]:
    """The build output dir and its manifest.json, or InstallError with the hint to build."""
    out = settings.out(recipe.name, builder)
    mf = out / "manifest.json"
    rebuild = f"rebuild: `invoke build --recipe {recipe.name} --builder {builder} --force`"
    if not mf.is_file():
        raise InstallError(f"no build artifacts for {recipe.name}/{builder} (no {mf})",
                           hint=f"run `invoke build --recipe {recipe.name} --builder {builder}` "
                                "first")
    try:
        bm = BuildManifest.load(mf)
    except ManifestError as e:
        raise InstallError(f"build manifest {mf} is unreadable: {e.message}",
                           hint=rebuild) from None
    for a in bm.artifacts:
        p = out / a.path
        if not p.is_file():
            raise InstallError(f"build output incomplete: {p} is listed in {mf} but missing",
                               hint=rebuild)
    return out, bm


def binary_path(recipe: Recipe, root: Path, base: str = QEMU_NAME) -> Path:
    """Where binary `base` is installed under root (DESTDIR+PREFIX): bindir/<name>, or
    root/<name> when the recipe's binary_names value has a "/" (relative to the prefix, e.g.
    RHEL's libexec/qemu-kvm)."""
    name = (recipe.install.get("binary_names", {}) or {}).get(base, base)
    return root / name if "/" in name else root / (recipe.install.get("bindir") or "bin") / name


def _binary_items(recipe: Recipe, out: Path, bm: BuildManifest, root: Path,
                  mode: str) -> list[Item]:
    items = []
    for a in bm.artifacts:
        if a.kind != "binary":
            continue
        src = out / a.path
        base = os.path.basename(a.path)
        dest = binary_path(recipe, root, base)
        m = int(a.mode, 8) if isinstance(a.mode, str) else int(a.mode or 0o755)
        if mode == "symlink":
            items.append(Item(dest, None, a.sha256, m, "binary", base, link_target=src.resolve()))
        else:
            items.append(Item(dest, src, a.sha256, m, "binary", base))
    return items


# ---------------------------------------------------------------------------------------------
# install
def install(settings: Settings, recipe: Recipe | str, builder: str, *,
            prefix: str | None = None,
            destdir: str | None = None, mode: str = "copy", dry_run: bool = False,
            timeout: float = 900, install_deps: bool = False) -> InstallResult:
    """Install the built binaries under DESTDIR/PREFIX (copy, symlink or the tree's own
    make install). First the shared libraries the build recorded (manifest runtime_deps) are
    checked on this host: missing ones are refused with the apt-get line, or installed with
    install_deps."""
    if mode not in MODES:
        raise InstallError(f"unknown install mode {mode!r}", hint="one of: " + ", ".join(MODES))
    recipe = recipe_of(settings, recipe)
    builder = builder or settings.builder
    out, bm = load_build(settings, recipe, builder)
    t = target(prefix, destdir, recipe)
    mpath, m = open_manifest(settings, t)
    warnings: list[str] = []
    deps_installed = deps.ensure_runtime_deps(settings, recipe, builder, bm,
                                              install_deps=install_deps, dry_run=dry_run,
                                              warnings=warnings)
    staging: Path | None = None
    try:
        if mode == "make-install":
            staging, items, more = _make_install_items(settings, recipe, builder, bm, t, timeout)
            warnings += more
        else:
            items = _binary_items(recipe, out, bm, t.root, mode)
        if not items:
            raise InstallError(f"the build of {recipe.name}/{builder} lists no binaries",
                               hint="check artifacts.binaries in the recipe and rebuild")
        rows, txn = apply(items, m, "install", "install", dry_run=dry_run)
        if txn is not None:
            _record_install(m, recipe, builder, mode, out, bm)
            save_manifest(mpath, m, txn)
        warnings += _prefix_warning(bm, t)
        return InstallResult(t.prefix, t.destdir, t.root, mode, mpath, rows,
                             all(r.status == "already correct" for r in rows), warnings,
                             deps_installed)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _record_install(m: InstallManifest, recipe: Recipe, builder: str, mode: str, out: Path,
                    bm: BuildManifest) -> None:
    m.installs.append({"recipe": recipe.name, "builder": builder, "mode": mode,
                       "build_out": str(out), "build_source_sha256": bm.source_sha256 or None,
                       "configured_prefix": bm.config.get("prefix"),
                       "configured_datadir": bm.config.get("datadir"), "time": now()})


def _prefix_warning(bm: BuildManifest, t: InstallTarget) -> list[str]:
    configured = bm.config.get("prefix")
    if not configured or target(configured).prefix == t.prefix:
        return []
    return [f"the binary was configured for prefix {configured}; installed under {t.root} it "
            f"finds firmware only next to itself ({t.root}/share/qemu): run `invoke install-bios`"
            " with the same --prefix/--destdir"]


# ---------------------------------------------------------------------------------------------
# make-install: the kept build tree's own `make install DESTDIR=<staging>`, then copied
def _make_install_items(settings: Settings, recipe: Recipe, builder: str, bm: BuildManifest,
                        t: InstallTarget, timeout: float) -> tuple[Path, list[Item], list[str]]:
    build_dir = Path(bm.build_dir or "")
    if not bm.build_dir or not build_dir.is_dir():
        raise InstallError(f"the build tree of {recipe.name}/{builder} is gone "
                           f"({bm.build_dir or 'not recorded'}); make-install needs it",
                           hint="use --mode copy, or rebuild with `invoke build --force`")
    tmp_parent = settings.state_dir / "tmp"
    tmp_parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="make-install-", dir=tmp_parent))
    os.chmod(staging, 0o755)
    cmd = list(recipe.build.get("install") or ["make", "install"]) + [f"DESTDIR={staging}"]
    try:
        if builder == "native":
            rc, log = _make_install_native(cmd, build_dir, timeout)
        else:
            rc, log = _run_in_builder(_builder_image(settings, recipe, builder, bm), cmd,
                                      build_dir, staging, dict(bm.get("env") or {}), timeout,
                                      what=f"`make install` in the {builder} builder")
        if rc != 0:
            tail = "\n".join(log.strip().splitlines()[-15:])
            raise InstallError(f"`{' '.join(cmd[:2])}` failed in the {builder} builder "
                               f"(exit {rc}):\n{tail}",
                               hint="the build tree may be stale: `invoke build --force`")
        items, warnings = _staged_items(staging, bm, t)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging, items, warnings


def _make_install_native(cmd: list[str], build_dir: Path, timeout: float) -> tuple[int, str]:
    try:
        r = proc.run(cmd, timeout=timeout, cwd=build_dir)
    except proc.CommandTimeout:
        raise InstallError(f"`{' '.join(cmd)}` timed out after {timeout:.0f} s") from None
    return r.returncode, r.stdout + r.stderr


def _staged_items(staging: Path, bm: BuildManifest, t: InstallTarget
                  ) -> tuple[list[Item], list[str]]:
    """What `make install` put into staging, mapped from the configured prefix to t's."""
    configured = target(bm.config.get("prefix") or t.prefix).prefix.rstrip("/")
    prefix = t.prefix
    items: list[Item] = []
    warnings: list[str] = []
    for dirpath, dirnames, filenames in os.walk(staging):
        dirnames.sort()
        for fn in sorted(filenames):
            src = Path(dirpath) / fn
            rel = "/" + str(src.relative_to(staging))
            if os.path.islink(src):
                warnings.append(f"make install created a symlink {rel}; not installed")
                continue
            runtime = prefix.rstrip("/") + rel[len(configured):] \
                if rel.startswith(configured + "/") else rel
            st = src.stat()
            rp = os.path.relpath(runtime, prefix) if runtime.startswith(prefix) else runtime
            kind = "binary" if st.st_mode & 0o111 and "/bin/" in "/" + rp else \
                ("firmware" if FIRMWARE_RE.search(fn) else "data")
            items.append(Item(t.path(runtime), src, sha256_file(src), stat.S_IMODE(st.st_mode),
                              kind, fn))
    if not items:
        raise InstallError("`make install` installed nothing",
                           hint="check build.install in the recipe")
    return items, warnings


def _builder_image(settings: Settings, recipe: Recipe, builder: str, bm: BuildManifest) -> str:
    """The image that built the tree (the manifest's image_id) while the daemon still has it;
    else the recipe's image for this builder (builders.NAME.image, else docker/<builder>)."""
    client = images.docker_client()
    if bm.image_id and images.find_image(client, bm.image_id) is not None:
        return bm.image_id
    return images.ensure_image(settings, recipe.builder(builder).image or builder,
                               client=client).id


def _run_in_builder(image: str, cmd: list[str], tree: Path, staging: Path, env: dict[str, str],
                    timeout: float, what: str) -> tuple[int, str]:
    """(exit status, output) of cmd in image through the one container runner
    (kvmlab.build.containers): as this user, no network, the build tree at its own absolute path
    (as the build mounted it) and staging bound read-write; removed in every case."""
    out = io.StringIO()
    try:
        rc = containers.run_in_container(
            images.docker_client(), image, cmd, workdir=tree,
            binds={str(tree): str(tree), str(staging): str(staging)},
            env={"HOME": "/tmp", "LC_ALL": "C", **env}, sink=out,
            name=f"kvmlab-make-install-{os.getpid()}", timeout=timeout,
            labels={"kvmlab": "make-install"}, what=what)
    except BuildError as e:   # the runner's timeout: an install error here
        raise InstallError(e.message, hint=e.hint) from None
    return rc, out.getvalue()
