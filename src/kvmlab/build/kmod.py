"""kmodbuild: kvm.ko + kvm-intel.ko + kvm-amd.ko built from a kernel source as external modules
(``make -C <headers> M=<dir> modules``) in a builder container, for recipes of kind "kmod".

Steps (each a function; ``build_kmod`` runs them all):

1. prepare (container, skipped when its Stamp is fresh): extract the recipe's ``[kmod] dirs``
   (arch/x86/kvm, virt/kvm) from the kernel source into ``work/<recipe>/kmod-src-<builder>/``
   (pristine), check its sha256 and the headers, and record facts about the target headers and
   the compiler (``kvmlab-facts.env``). The source is either a file inside the builder image
   (``kmod.source = "image"``: Debian's /usr/src/linux-source-6.1.tar.xz) or fetched by
   kvmlab.source.fetch (``kmod.source = "fetch"``: a kernel tarball URL + sha256, or an SRPM with
   ``kmod.srpm_tarball``; ``--source PATH`` gives a local tarball or kernel tree).
2. patch (host): copy the pristine tree to ``work/<recipe>/build-<builder>/`` and apply the
   builder's patch series (kvmlab.source.patch: ``FILE if=OPTION`` lines; ``debug-vmx``).
3. compat (host): decide from the facts which compatibility items the target needs
   (kvmlab.build.kmodspec) and put them in the build tree.
4. make (container): ``make -C <headers> M=<build>/<module_dir> KCFLAGS=... -jN modules``.
5. collect (host, kvmlab.build.collect): copy the .ko files to ``out/<recipe>/<builder>/`` with a
   manifest.json whose per-module vermagic/srcversion/depends/build id are read from each .ko
   (kvmlab.core.elf; no modinfo binary needed).

Loading the result is kvmlab.build.kmodules (modules_from, load_order, check_vermagic).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmlab.build import images
from kvmlab.build.collect import completed_stamp, copy_artifact, publish, up_to_date
from kvmlab.build.containers import (
    CCACHE_DIR,
    CONTAINER_PATH,
    LogSink,
    build_binds,
    container_name,
    run_in_container,
)
from kvmlab.build.kmodspec import (
    KmodSpec,
    compat_plan,
    facts_script,
    kmod_spec,
    parse_facts,
    prefix_map_flags,
)
from kvmlab.build.kmodules import _depends, module_name, vermagic_release
from kvmlab.build.layout import DEFAULT_TIMEOUT, BuildResult, build_dir, log_path
from kvmlab.core import ui
from kvmlab.core.elf import read_build_id, read_modinfo
from kvmlab.core.errors import BuildError, RecipeError
from kvmlab.core.fsutil import json_sha256, replace_dir, tree_sha256
from kvmlab.core.proc import sigterm_as_interrupt
from kvmlab.core.records import utc_stamp
from kvmlab.core.settings import Settings
from kvmlab.core.stamps import Stamp
from kvmlab.model.recipe import Recipe, load_recipe
from kvmlab.source.fetch import FetchResult, fetch_source
from kvmlab.source.patch import apply_series, read_series

FACTS_FILE = "kvmlab-facts.env"
PREPARED_STAMP = ".kvmlab-prepared.json"
COMPAT_DIR = "kvmlab-compat"          # inside the build tree
PREPARE_VERSION = 1                   # bump when the prepare script changes


_EXIT_MEANING = {
    3: "the kernel source is not in the builder container (image path or staged file)",
    4: "the kernel headers directory is not in the builder image",
    5: "the kernel source tarball's sha256 differs from the recipe's source.sha256",
    6: "the kernel source has no such directory",
}


def compat_source(settings: Settings, spec: KmodSpec) -> Path | None:
    """compat/<name>/ of the project (None when the recipe names none)."""
    if not spec.compat:
        return None
    d = settings.home / "compat" / spec.compat
    if not d.is_dir():
        raise BuildError(f"compat directory {d} (from [kmod] compat = {spec.compat!r}) is missing")
    return d


def fetch_kernel_source(settings: Settings, recipe: Recipe, spec: KmodSpec, *,
                        source: str | Path | None = None, offline: bool = False) -> Any:
    """kmod.source = "fetch" (or --source PATH): the kernel tarball/SRPM through kvmlab.source.fetch
    (cache, sha256 pin or lock), or a local kernel tree. None for kmod.source = "image"."""
    if spec.source == "image":
        return None
    return fetch_source(settings, recipe, source=source, offline=offline)


def _extract_lines(spec: KmodSpec, strip: int, fetched: Any) -> list[str]:
    """Shell lines extracting spec.dirs from "$S" into the current directory."""
    q = shlex.quote
    if fetched is not None and fetched.kind == "dir":       # a local tree: copy the dirs
        return [f'mkdir -p {q(str(Path(d).parent))} && cp -a "$S"/{q(d)} {q(d)}'
                for d in spec.dirs]
    pats = " ".join(q("*/" + d) if strip else q(d) for d in spec.dirs)
    tar = f"tar -x --wildcards --no-wildcards-match-slash --strip-components={strip} {pats}"
    if spec.source_path.endswith(".src.rpm") or (fetched is not None and
                                                  fetched.file.endswith(".src.rpm")):
        if not spec.srpm_tarball:
            raise RecipeError("the source is an SRPM: set [kmod] srpm_tarball to the kernel "
                              "tarball inside it (e.g. linux-2.6.32-754.el6.tar.bz2)")
        t = q(spec.srpm_tarball)
        return [f'echo "+ rpm2cpio $S | cpio -i --to-stdout {t} | {tar}"',
                f'rpm2cpio "$S" | cpio -i --quiet --to-stdout {t} > .kvmlab-kernel.tar',
                f'[ -s .kvmlab-kernel.tar ] || {{ echo "kvmlab: no {t} in $S"; exit 6; }}',
                f"{tar} -f .kvmlab-kernel.tar", "rm -f .kvmlab-kernel.tar"]
    return ['echo "+ tar -xf $S (' + " ".join(spec.dirs) + ')"', f'{tar} -f "$S"']


def _prepare_inputs(spec: KmodSpec, image: Any, fetched: FetchResult | None) -> dict[str, Any]:
    return {"v": PREPARE_VERSION, "image_id": image.id,
            "source": spec.source_path if fetched is None else fetched.file,
            "source_sha256": fetched.sha256 if fetched is not None else spec.source_sha256,
            "dirs": list(spec.dirs), "headers": spec.headers}


def _stage(wdir: Path, spec: KmodSpec, fetched: FetchResult | None) -> tuple[str, Path | None]:
    """(the source's path as the container sees it, the staged copy to remove afterwards)."""
    if fetched is None:
        return spec.source_path, None
    if fetched.kind == "dir":     # only the kvm dirs are needed: stage those
        staged = wdir / ".kmod-source-tree"
        shutil.rmtree(staged, ignore_errors=True)
        for d in spec.dirs:
            if not (Path(fetched.path) / d).is_dir():
                raise BuildError(f"--source {fetched.path} has no {d}/ (kmod.dirs)")
            shutil.copytree(Path(fetched.path) / d, staged / d, symlinks=True)
        return str(staged), staged
    staged = wdir / f".kmod-source-{fetched.file}"   # the cached, verified file
    staged.unlink(missing_ok=True)
    try:
        os.link(fetched.path, staged)
    except OSError:
        shutil.copy2(fetched.path, staged)
    return str(staged), staged


def _prepare_script(recipe: Recipe, spec: KmodSpec, fetched: FetchResult | None, spath: str,
                    tmp: Path) -> str:
    q = shlex.quote
    check = "-d" if fetched is not None and fetched.kind == "dir" else "-f"
    lines = ["set -e", f"S={q(spath)}", f"H={q(spec.headers)}",
             f'[ {check} "$S" ] || {{ echo "kvmlab: $S: not in the container"; exit 3; }}',
             '[ -d "$H" ] || { echo "kvmlab: $H: no such directory in the image"; exit 4; }']
    if fetched is None and recipe.source.pinned:
        lines.append(f'echo "{spec.source_sha256}  $S" | sha256sum -c - || exit 5')
    lines.append(facts_script(spec, f"{tmp}/{FACTS_FILE}"))
    if fetched is None:
        lines.append(f'echo "SOURCE_SHA256=$(sha256sum "$S" | cut -d" " -f1)" >> '
                     f'{q(str(tmp))}/{FACTS_FILE}')
    lines += [f"cd {q(str(tmp))}",
              *_extract_lines(spec, recipe.source.strip_components, fetched)]
    lines += [f'[ -d {q(d)} ] || {{ echo "kvmlab: no {d} in $S"; exit 6; }}' for d in spec.dirs]
    return "\n".join(lines)


def _check_facts(spec: KmodSpec, facts: dict[str, str], fetched: FetchResult | None) -> None:
    """The builder image's headers (and source package) are the recipe's."""
    problems = []
    if facts.get("UTS_RELEASE") != spec.kernel_release:
        problems.append(f"the headers are for {facts.get('UTS_RELEASE')!r}, the recipe says "
                        f"kmod.kernel_release = {spec.kernel_release!r}")
    pkgs = [("HEADERS_PACKAGE_VERSION", spec.headers_package)]
    if fetched is None:   # the source is a package in the image too: same version
        pkgs.append(("SOURCE_PACKAGE_VERSION", spec.source_package))
    for key, what in pkgs:
        if spec.package_version and what and facts.get(key) != spec.package_version:
            problems.append(f"{what} in the image is {facts.get(key) or 'not installed'!r}, the "
                            f"recipe says kmod.package_version = {spec.package_version!r}")
    if problems:
        raise BuildError("the builder image does not match the recipe: " + "; ".join(problems),
                         hint="source and headers must be the same kernel version: align the "
                              "Dockerfile's pinned versions and the recipe's [kmod] table")


def prepare_source(settings: Settings, recipe: Recipe, spec: KmodSpec, builder: str, image: Any,
                   client: Any, sink: LogSink, *, force: bool = False,
                   fetched: FetchResult | None = None,
                   timeout: float = 3600) -> tuple[Path, dict[str, str]]:
    """Extract spec.dirs from the kernel source (in the image, or fetched: kvmlab.source.fetch's
    FetchResult) to work/<recipe>/kmod-src-<builder> (pristine; skipped when its Stamp is
    fresh) and gather the facts in the builder. Returns (dir, facts)."""
    wdir = settings.work(recipe.name)
    pristine = wdir / f"kmod-src-{builder}"
    inputs = _prepare_inputs(spec, image, fetched)
    facts = None if force else Stamp(pristine / PREPARED_STAMP, "kmod-prepare").fresh(inputs)
    if facts is not None:
        return pristine, facts
    wdir.mkdir(parents=True, exist_ok=True)
    tmp = wdir / f".kmod-src-{builder}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    staged: Path | None = None
    try:
        spath, staged = _stage(wdir, spec, fetched)
        ui.info(f"extracting {', '.join(spec.dirs)} from "
                f"{spec.source_path if fetched is None else fetched.path} in {image.ref}")
        rc = run_in_container(client, image.ref, _prepare_script(recipe, spec, fetched, spath, tmp),
                              workdir=wdir, binds=build_binds(wdir), env={"LC_ALL": "C"},
                              sink=sink, name=container_name("kmod", recipe.name, builder,
                                                             "prepare"), timeout=timeout)
        if rc != 0:
            sink.show_tail()
            raise BuildError(f"preparing the kernel source failed (exit {rc}): "
                             f"{_EXIT_MEANING.get(rc, 'see the log')}",
                             hint=f"log: {sink.path}; image {image.ref} (docker/"
                                  f"{recipe.builder(builder).image or builder}/Dockerfile)")
        facts = parse_facts((tmp / FACTS_FILE).read_text())
        if fetched is not None:
            facts["SOURCE_SHA256"] = fetched.sha256
        _check_facts(spec, facts, fetched)
        Stamp(tmp / PREPARED_STAMP, "kmod-prepare").write(inputs, facts)
        replace_dir(tmp, pristine)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if staged is not None:
            if staged.is_dir():
                shutil.rmtree(staged, ignore_errors=True)
            else:
                staged.unlink(missing_ok=True)
    return pristine, facts


def kbuild_wrapper(makefile_text: str, tree: Path, exists_in: Path | None = None) -> str:
    """A Kbuild file for <tree>/<module_dir> (kbuild prefers Kbuild over Makefile): the directory's
    own Makefile with every $(srctree)/PATH that exists in our tree (not in the headers) pointed
    at the tree, e.g. 6.1's `include $(srctree)/virt/kvm/Makefile.kvm` and
    `-I $(srctree)/arch/x86/kvm`. exists_in: where the tree is now (default: tree)."""
    def repl(m: re.Match) -> str:
        rel = m.group(1)
        return f"$(KVMLAB_SRC)/{rel}" if ((exists_in or tree) / rel).exists() else m.group(0)
    body = re.sub(r"\$\(srctree\)/([\w./+-]+)", repl, makefile_text)
    return ("# Generated by kvmlab (kmodbuild.kbuild_wrapper): this directory's Makefile, built\n"
            "# outside the kernel tree, with $(srctree)/ paths that only exist here redirected.\n"
            f"KVMLAB_SRC := {tree}\n\n" + body)


def _expand(flags: Iterable[str], tree: Path) -> list[str]:
    return [f.replace("{src}", str(tree)) for f in flags]


@dataclass
class _KJob:
    """One kmod build: the recipe, its spec and image, and where it goes."""
    settings: Settings
    recipe: Recipe
    spec: KmodSpec
    builder: str
    entries: list[Any]
    csrc: Path | None
    fetched: FetchResult | None
    client: Any
    image: Any
    bdir: Path
    out: Path
    inputs: dict[str, Any]


def build_kmod(settings: Settings, recipe: Recipe | str, builder: str, *, jobs: int = 2,
               force: bool = False, source: str | Path | None = None, offline: bool = False,
               quiet: bool = False, timeout: float | None = None) -> BuildResult:
    """Build a kind = "kmod" recipe: BuildResult(out_dir, manifest, noop)."""
    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    if isinstance(recipe, str):
        recipe = load_recipe(settings.recipes_dir, recipe)
    spec = kmod_spec(recipe)
    recipe.builder(builder)  # RecipeError for an unknown builder
    if builder == "native":
        raise BuildError("kmod recipes build in their builder image, not with --builder native",
                         hint=f"use --builder {next(iter(recipe.builders), 'debian12')}")
    if source and spec.source == "image":
        raise BuildError(f"--source does not apply to {recipe.name}: its kernel source is inside "
                         "the builder image (kmod.source = \"image\")")
    if jobs < 1:
        raise BuildError(f"--jobs must be at least 1, got {jobs}")
    job = _kjob(settings, recipe, spec, builder, source=source, offline=offline, quiet=quiet)
    recorded = None if force else up_to_date(job.out, job.inputs)
    if recorded is not None:
        ui.info(f"[cyan]no-op[/cyan]: {recipe.name} ({builder}) is up to date; modules in "
                f"{job.out}")
        return BuildResult(job.out, recorded, True)
    settings.work(recipe.name).mkdir(parents=True, exist_ok=True)
    log = log_path(settings, recipe.name, builder)
    t0 = time.monotonic()
    sink = LogSink(log, quiet=quiet)
    try:
        with sigterm_as_interrupt():
            pristine, facts = prepare_source(settings, recipe, spec, builder, job.image,
                                             job.client, sink, force=force, fetched=job.fetched,
                                             timeout=timeout)
            t_prep = time.monotonic() - t0
            plan, kcflags = _make_tree(job, pristine, facts)
            make = ["make", "-C", spec.headers, f"M={job.bdir / spec.module_dir}", f"-j{jobs}",
                    "KCFLAGS=" + " ".join(kcflags),
                    "KAFLAGS=" + " ".join(prefix_map_flags(facts, job.bdir)), "modules"]
            if plan.items:
                ui.info("compat for this target: " + ", ".join(plan.items))
            ui.info(f"building {recipe.name} with {builder} ({job.image.ref}) in {job.bdir}; "
                    f"log: {log}")
            t1 = time.monotonic()
            _make(job, make, sink, timeout)
            seconds = {"prepare": round(t_prep, 1), "make": round(time.monotonic() - t1, 1),
                       "total": round(time.monotonic() - t0, 1)}
            manifest = _manifest(job, facts, plan.to_dict(), make, log, seconds)
            completed_stamp(job.bdir).write(job.inputs, {"out": str(job.out)})
            manifest = collect_modules(recipe, spec, job.bdir, job.out, manifest)
    finally:
        sink.close()
    ui.info(f"[green]built[/green] {recipe.name} ({builder}) in {time.monotonic() - t0:.0f} s: "
            + ", ".join(f"{a['path']} ({a['vermagic'].split()[0]})"
                        for a in manifest["artifacts"]) + f" in {job.out}")
    return BuildResult(job.out, manifest, False)


def _kjob(settings: Settings, recipe: Recipe, spec: KmodSpec, builder: str, *,
          source: str | Path | None, offline: bool, quiet: bool) -> _KJob:
    """Everything the build's inputs hash needs: series, compat files, source, image."""
    entries = read_series(settings.patches_dir, recipe, builder)
    csrc = compat_source(settings, spec)
    fetched = fetch_kernel_source(settings, recipe, spec, source=source, offline=offline)
    client = images.docker_client()
    image = images.recipe_image(settings, recipe, builder, offline=offline, client=client,
                                quiet=quiet)
    bdir = build_dir(settings, recipe.name, builder)
    if re.search(r"\s", str(bdir)):
        raise BuildError(f"the build directory {bdir} contains whitespace, which KCFLAGS cannot "
                         "carry", hint="set KVMLAB_STATE_DIR to a path without spaces")
    inputs = {"recipe_sha256": recipe.sha256, "image_id": image.id, "builder": builder,
              "source_sha256": fetched.sha256 if fetched is not None else spec.source_sha256,
              "patches": [e.record() for e in entries if e.active],
              "compat": tree_sha256(csrc) if csrc else None,
              "options": {k: recipe.options[k] for k in sorted(recipe.options)}}
    return _KJob(settings, recipe, spec, builder, entries, csrc, fetched, client, image, bdir,
                 settings.out(recipe.name, builder), inputs)


def _make_tree(job: _KJob, pristine: Path, facts: dict[str, str]) -> tuple[Any, list[str]]:
    """A fresh build tree: pristine copy + series + compat files + Kbuild wrapper, swapped into
    place. Returns (the compat plan, KCFLAGS)."""
    bdir, spec = job.bdir, job.spec
    tmp = bdir.with_name(f".{bdir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(pristine, tmp, symlinks=True)
        (tmp / PREPARED_STAMP).unlink(missing_ok=True)
        apply_series(tmp, job.entries)
        plan = compat_plan(facts, job.csrc, str(bdir / COMPAT_DIR))
        for rel, text in plan.files.items():
            p = tmp / COMPAT_DIR / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
        kcflags = _expand(spec.kcflags, bdir) + list(plan.kcflags) + \
            prefix_map_flags(facts, bdir)
        for f in kcflags:   # directories named in kcflags (include/trace) must exist
            if f.startswith(str(bdir) + "/") and "=" not in f:
                (tmp / Path(f).relative_to(bdir)).mkdir(parents=True, exist_ok=True)
        mk = tmp / spec.module_dir / "Makefile"
        if mk.is_file() and not (tmp / spec.module_dir / "Kbuild").exists():
            (tmp / spec.module_dir / "Kbuild").write_text(
                kbuild_wrapper(mk.read_text(), bdir, tmp))
        replace_dir(tmp, bdir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return plan, kcflags


def _make(job: _KJob, make: list[str], sink: LogSink, timeout: float) -> None:
    script = "\n".join([
        "set -e",
        "gcc --version 2>/dev/null | head -n 1 > .kvmlab-compiler || true",
        "echo " + shlex.quote("+ " + " ".join(shlex.quote(a) for a in make)),
        " ".join(shlex.quote(a) for a in make)])
    env = {"CCACHE_DIR": CCACHE_DIR, "PATH": CONTAINER_PATH, "HOME": "/tmp",
           "LC_ALL": "C"}   # no CCACHE_BASEDIR: it would rewrite paths to relative
    rc = run_in_container(job.client, job.image.ref, script, workdir=job.bdir,
                          binds=build_binds(job.bdir), env=env, sink=sink,
                          name=container_name("kmod", job.recipe.name, job.builder, "make"),
                          timeout=timeout)
    sink.close()
    if rc != 0:
        sink.show_tail()
        raise BuildError(f"building the modules of {job.recipe.name} with {job.builder} failed "
                         f"(exit {rc})", hint=f"full log: {sink.path}; build tree: {job.bdir}")


def _manifest(job: _KJob, facts: dict[str, str], compat: dict[str, Any], make: list[str],
              log: Path, seconds: dict[str, float]) -> dict[str, Any]:
    spec, fetched = job.spec, job.fetched
    cfile = job.bdir / ".kvmlab-compiler"
    return {
        "recipe": job.recipe.name, "kind": "kmod", "recipe_sha256": job.recipe.sha256,
        "builder": job.builder, "image": job.image.ref, "image_id": job.image.id,
        "source_sha256": facts.get("SOURCE_SHA256") or spec.source_sha256,
        "source": {"package": spec.source_package,
                   "version": facts.get("SOURCE_PACKAGE_VERSION", ""),
                   "path": spec.source_path if fetched is None else str(fetched.path),
                   "origin": "image" if fetched is None else fetched.origin,
                   "dirs": list(spec.dirs)},
        "headers": {"package": spec.headers_package,
                    "version": facts.get("HEADERS_PACKAGE_VERSION", ""),
                    "dir": spec.headers, "release": facts.get("UTS_RELEASE", "")},
        "kernel_release": spec.kernel_release,
        "patches": job.inputs["patches"], "options": job.inputs["options"],
        "compat": compat, "facts": facts, "kcflags": list(spec.kcflags), "make": make,
        "compiler": cfile.read_text(errors="replace").strip() if cfile.is_file() else "",
        "build_dir": str(job.bdir), "log": str(log), "inputs_sha256": json_sha256(job.inputs),
        "built_at": utc_stamp(),
        "seconds": seconds,
    }


def collect_modules(recipe: Recipe, spec: KmodSpec, bdir: Path, out: Path,
                    manifest: dict) -> dict:
    """Copy the recipe's modules to out/ (all or nothing) with the manifest; every module's
    vermagic must name the recipe's kernel release."""
    missing = [rel for rel in recipe.artifacts["modules"] if not (bdir / rel).is_file()]
    if missing:
        raise BuildError(f"the build finished but {', '.join(missing)} were not built",
                         hint=f"check the headers' CONFIG_KVM* options and {bdir}")

    def fill(tmp: Path) -> dict:
        arts = []
        for rel in recipe.artifacts["modules"]:
            info = read_modinfo(bdir / rel)
            if vermagic_release(info["vermagic"]) != spec.kernel_release:
                raise BuildError(f"{rel} has vermagic {info['vermagic']!r}, not for "
                                 f"{spec.kernel_release}", hint="the headers are not the "
                                 "recipe's: check [kmod] headers / kernel_release")
            build_id, note = read_build_id(bdir / rel)
            arts.append(copy_artifact(
                bdir / rel, tmp, Path(rel).name, "module", rel,
                name=module_name(bdir / rel, info), vermagic=info["vermagic"],
                srcversion=info.get("srcversion", ""), depends=_depends(info),
                build_id=build_id, build_id_note=note, license=info.get("license", "")))
        return {**manifest, "artifacts": arts}
    return publish(out, fill)
