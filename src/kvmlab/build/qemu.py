"""build: configure + make a prepared (fetched, unpacked, patched) qemu source tree in its builder.

The builder is a container (kvmlab.build.containers, the recipe's image) or the host
(``native``); the artifacts then go to ``out/<recipe>/<builder>/`` with a manifest.json
(kvmlab.build.collect; layout in kvmlab.build.layout) whose "runtime_deps" come from
kvmlab.build.deps. kind = "kmod" recipes are handed to kvmlab.build.kmod.

The build tree is kept in ``work/<recipe>/build-<builder>`` (manifest "build_dir") and is mounted
into the container at the same absolute path, so its Makefiles also work from the host (make
install). A build whose inputs (recipe, source, patches, image, configure args, cflags, env) are
unchanged since the build that completed in that tree (its Stamp) is a no-op that does not
contact docker.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmlab.build import collect, deps, images, kmod
from kvmlab.build.containers import (
    CCACHE_DIR,
    CONTAINER_PATH,
    LogSink,
    build_binds,
    container_name,
    run_in_container,
)
from kvmlab.build.layout import (
    DEFAULT_TIMEOUT,
    BuildResult,
    build_dir,
    build_lock,
    log_path,
)
from kvmlab.core import proc, ui
from kvmlab.core.errors import BuildError, KvmlabError
from kvmlab.core.fsutil import json_sha256
from kvmlab.core.proc import sigterm_as_interrupt
from kvmlab.core.records import utc_stamp
from kvmlab.core.settings import Settings
from kvmlab.model.recipe import Recipe, load_recipe
from kvmlab.source import prepare as pipeline
from kvmlab.source.fetch import check_source

COMPILER_FILE = ".kvmlab-compiler"
# in the build tree: "<phase> <epoch seconds>" when configure and make start, "end ..." when
# the last one ends (written by the builder's shell or run_native; read by read_phases)
PHASES_FILE = ".kvmlab-phases"
PHASES = ("configure", "make")


# --------------------------------------------------------------------------------------------
# the build's commands and environment

def _commands(recipe: Recipe, builder: str, jobs: int) -> tuple[list[str], list[str]]:
    configure = recipe.configure_args(builder)
    make = [a.replace("{jobs}", str(jobs)) for a in recipe.build.get("make") or ["make"]]
    return configure, make


# `build --debug`: qemu-kvm 0.12's configure leaves -O2 out with --enable-debug (which also turns
# stripping off and debug-tcg on; the last is noisy and slow, so it is turned off again), and
# -O0 -g go into the one --extra-cflags; --disable-strip keeps `make install` from stripping.
DEBUG_CONFIGURE = ["--enable-debug", "--disable-debug-tcg", "--disable-strip"]
DEBUG_CFLAGS = "-O0 -g"
DEBUG_SUFFIX = "-debug"


def flavour_dir(builder: str, debug: bool) -> str:
    """The name under out/<recipe>/ and work/<recipe>/build-*: ``<builder>`` or
    ``<builder>-debug``, so a debug build never replaces the release build."""
    return builder + (DEBUG_SUFFIX if debug else "")


def debug_args(configure: list[str]) -> list[str]:
    """Configure args of the debug flavour: -O0 -g merged into --extra-cflags, no strip."""
    out, merged = [], False
    for a in configure:
        if a.startswith("--extra-cflags=") and not merged:
            a, merged = f"{a} {DEBUG_CFLAGS}", True
        out.append(a)
    return out + ([] if merged else [f"--extra-cflags={DEBUG_CFLAGS}"]) + DEBUG_CONFIGURE


def with_prefix_map(configure: list[str], bdir: Path) -> list[str]:
    """Configure args that make the build independent of where its tree lives: the build
    directory is mapped to "." in debug info, __FILE__ and macros (-ffile-prefix-map), merged into
    the one --extra-cflags qemu's configure honours (a second one would replace the first)."""
    flag = f"-ffile-prefix-map={bdir}=."
    out, merged = [], False
    for a in configure:
        if a.startswith("--extra-cflags=") and not merged:
            a, merged = f"{a} {flag}", True
        out.append(a)
    return out if merged else out + [f"--extra-cflags={flag}"]


def _env(recipe: Recipe, builder: str) -> dict[str, str]:
    b = recipe.builder(builder)
    env = {str(k): str(v) for k, v in (recipe.build.get("env") or {}).items()}
    env.update({str(k): str(v) for k, v in b.env.items()})
    if b.cflags:
        env["CFLAGS"] = (env.get("CFLAGS", "") + " " + b.cflags).strip()
    return env


def _script(configure: list[str], make: list[str]) -> str:
    """The shell script run in the builder: compiler version, configure, make (argument lists
    quoted with shlex; no user input is interpreted by the shell)."""
    c = " ".join(shlex.quote(a) for a in configure)
    m = " ".join(shlex.quote(a) for a in make)
    return "\n".join([
        "set -e",
        f"cc --version 2>/dev/null | head -n 1 > {COMPILER_FILE} || true",
        _mark("configure", truncate=True),
        f"echo '+ {c}'" if "'" not in c else "true",
        c,
        _mark("make"),
        f"echo '+ {m}'" if "'" not in m else "true",
        m,
        _mark("end"),
    ])


def _mark(phase: str, truncate: bool = False) -> str:
    """A shell line that records when a phase starts (date +%s.%N: GNU date, as in both
    builder images; a date without %N gives whole seconds, read all the same)."""
    return f'echo "{phase} $(date +%s.%N)" {">" if truncate else ">>"} {PHASES_FILE} || true'


def read_phases(bdir: Path) -> dict[str, float]:
    """Seconds per phase (configure, make) from the marks in the build tree; a phase without
    both marks (an older tree, a failed run) is left out."""
    try:
        lines = (bdir / PHASES_FILE).read_text(errors="replace").splitlines()
    except OSError:
        return {}
    marks: list[tuple[str, float]] = []
    for line in lines:
        name, _, when = line.partition(" ")
        try:
            marks.append((name, float(when.strip().rstrip("N").rstrip("."))))
        except ValueError:
            continue
    out = {}
    for (name, t0), (_, t1) in zip(marks, marks[1:], strict=False):
        if name in PHASES and t1 >= t0:
            out[name] = round(t1 - t0, 3)
    return out


def source_date_epoch(src: Path) -> int:
    """A stable timestamp for reproducible builds: the newest mtime of the top-level source files
    as unpacked (tar mtimes)."""
    best = 0
    for name in ("VERSION", "KVM_VERSION", "configure", "Makefile"):
        p = src / name
        if p.is_file():
            best = max(best, int(p.stat().st_mtime))
    return best or 1262304000


# --------------------------------------------------------------------------------------------
# config read from the build tree

def _unquote(v: str) -> str:
    v = v.strip()
    if len(v) >= 2 and v[0] == v[-1] == '"':
        return v[1:-1]
    return v


def read_build_config(bdir: Path) -> dict[str, str | None]:
    """prefix and datadir (CONFIG_QEMU_SHAREDIR, the firmware dir compiled into the binary)."""
    prefix = datadir = None
    mak: dict[str, str] = {}
    p = bdir / "config-host.mak"
    if p.is_file():
        for line in p.read_text(errors="replace").splitlines():
            m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*[:+]?=\s*(.*)$", line)
            if m and m.group(1) not in mak:
                mak[m.group(1)] = m.group(2).strip()
    h = bdir / "config-host.h"
    if h.is_file():
        for line in h.read_text(errors="replace").splitlines():
            m = re.match(r'^\s*#\s*define\s+CONFIG_QEMU_SHAREDIR\s+(".*")', line)
            if m:
                datadir = _unquote(m.group(1))
    if "prefix" in mak:
        prefix = _unquote(mak["prefix"])
    if datadir is None and "CONFIG_QEMU_SHAREDIR" in mak:
        datadir = _unquote(mak["CONFIG_QEMU_SHAREDIR"])
    if datadir is None and "datadir" in mak:
        datadir = _unquote(mak["datadir"])
        if prefix is not None:
            datadir = datadir.replace("${prefix}", prefix).replace("$(prefix)", prefix)
    return {"prefix": prefix, "datadir": datadir}


# --------------------------------------------------------------------------------------------
# running configure + make on the host (the native builder)

def run_native(bdir: Path, cmds: list[list[str]], env: dict[str, str], sink: LogSink,
               timeout: float, phases: tuple[str, ...] = ()) -> int:
    """Run the commands one after the other in bdir, output to sink; the exit status of the
    first that fails (0: all passed). The whole run is killed after timeout seconds. ``phases``
    names the commands: their start times go to PHASES_FILE as the builder script writes them."""
    full_env = {**os.environ, **env}
    if Path("/usr/lib/ccache").is_dir():
        full_env["PATH"] = "/usr/lib/ccache:" + full_env.get("PATH", "")
    deadline = time.monotonic() + timeout
    try:
        out = proc.run(["cc", "--version"], timeout=30)
        (bdir / COMPILER_FILE).write_text(out.stdout.splitlines()[0] + "\n" if out.stdout else "")
    except KvmlabError:
        pass
    marks = bdir / PHASES_FILE
    marks.unlink(missing_ok=True)
    for i, cmd in enumerate(cmds):
        if i < len(phases):
            with open(marks, "a") as f:
                f.write(f"{phases[i]} {time.time():.3f}\n")
        sink.write("+ " + " ".join(shlex.quote(a) for a in cmd) + "\n")
        try:
            rc = proc.stream(cmd, cwd=bdir, env=full_env, on_line=sink.write,
                             timeout=max(0.1, deadline - time.monotonic()))
        except proc.CommandTimeout:
            raise BuildError(f"build timed out after {timeout:.0f} s and was stopped",
                             hint=f"set KVMLAB_BUILD_TIMEOUT (seconds); log: {sink.path}"
                             ) from None
        except (KvmlabError, OSError) as e:
            why = e.message if isinstance(e, KvmlabError) else e.strerror
            sink.write(f"cannot run {cmd[0]}: {why}\n")
            return 127
        if rc != 0:
            return rc
    if phases:
        with open(marks, "a") as f:
            f.write(f"end {time.time():.3f}\n")
    return 0


# --------------------------------------------------------------------------------------------
# the build

@dataclass
class _Job:
    """One qemu build: what it runs, where, and with which image."""
    settings: Settings
    recipe: Recipe
    builder: str
    prepared: pipeline.PreparedSource
    configure: list[str]
    make: list[str]
    env: dict[str, str]
    bdir: Path
    out: Path
    log: Path
    quiet: bool
    timeout: float
    image_ref: str | None = None
    image_id: str | None = None
    client: Any = None
    inputs: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    flavour: str = ""   # builder, or builder-debug (out/ and build tree names)


def build(settings: Settings, recipe: Recipe | str, builder: str, *, jobs: int = 2,
          force: bool = False, source: str | Path | None = None, offline: bool = False,
          quiet: bool = False, timeout: float = DEFAULT_TIMEOUT,
          prepared: pipeline.PreparedSource | None = None, debug: bool = False) -> BuildResult:
    """Build a recipe with a builder (debian12, centos6 or native). See the module docstring.

    debug: the -O0 -g, unstripped flavour in out/<recipe>/<builder>-debug/ (own build tree,
    log and manifest, "flavour": "debug").
    prepared: the source as the caller already prepared it (lab: the patch step), so it is
    not fetched, hashed and checked a second time."""
    if isinstance(recipe, str):
        recipe = load_recipe(settings.recipes_dir, recipe)
    if recipe.kind == "kmod":
        if debug:
            raise BuildError(f"--debug builds qemu recipes only; {recipe.name} is a kmod recipe",
                             hint="leave out --debug")
        return kmod.build_kmod(settings, recipe, builder, jobs=jobs, force=force,
                               source=source, offline=offline, quiet=quiet, timeout=timeout)
    recipe.builder(builder)  # RecipeError for an unknown builder
    if jobs < 1:
        raise BuildError(f"--jobs must be at least 1, got {jobs}")
    if source is not None and prepared is None:
        check_source(source, recipe)
    with build_lock(settings, recipe.name, builder):
        if prepared is None:
            prepared = pipeline.prepare(settings, recipe, builder, source=source,
                                        offline=offline)
        job = _job(settings, recipe, builder, prepared, jobs, quiet, timeout, debug)
        recorded = None if force else collect.up_to_date(job.out, job.inputs)
        if recorded is not None:
            ui.info(f"[cyan]no-op[/cyan]: {recipe.name} ({job.flavour}) is up to date; "
                    f"artifacts in {job.out}")
            return BuildResult(job.out, recorded, True)
        return _run(job, offline)


def _job(settings: Settings, recipe: Recipe, builder: str, prepared: pipeline.PreparedSource,
         jobs: int, quiet: bool, timeout: float, debug: bool = False) -> _Job:
    configure, make = _commands(recipe, builder, jobs)
    if debug:
        configure = debug_args(configure)
    fl = flavour_dir(builder, debug)
    job = _Job(settings, recipe, builder, prepared, configure, make, _env(recipe, builder),
               build_dir(settings, recipe.name, fl), settings.out(recipe.name, fl),
               log_path(settings, recipe.name, fl), quiet, timeout,
               name=container_name("build", recipe.name, fl), flavour=fl)
    if builder != "native":
        # the image: docker/<builders.NAME.image> when the recipe names one (e.g. debian12-el6),
        # else docker/<builder>; its tag is known without docker unless its base is external
        img_builder = recipe.builder(builder).image or builder
        dockerfile = images.docker_dir(settings, img_builder) / "Dockerfile"
        if images.local_base_name(dockerfile) is None:  # tag depends on a local image's id
            job.client = images.docker_client()
        repo, tag = images.image_ref(settings, img_builder, job.client)
        job.image_ref = f"{repo}:{tag}"
    job.inputs = {"recipe_sha256": recipe.sha256, "source_sha256": prepared.source_sha256,
                  "patches": [dict(p) for p in prepared.patches], "image": job.image_ref,
                  "builder": builder, "configure_args": configure,
                  "cflags": recipe.builder(builder).cflags, "env": job.env}
    return job


def _run(job: _Job, offline: bool) -> BuildResult:
    """Copy the prepared tree, configure + make it, collect the artifacts."""
    if job.builder != "native":
        job.client = job.client or images.docker_client()
        info = images.recipe_image(job.settings, job.recipe, job.builder, offline=offline,
                                   client=job.client)
        job.image_ref, job.image_id = info.ref, info.id
    job.settings.work(job.recipe.name).mkdir(parents=True, exist_ok=True)
    ui.info(f"building {job.recipe.name} with {job.flavour} "
            f"({job.image_ref or 'host toolchain'}) in {job.bdir}; log: {job.log}")
    t0 = time.monotonic()
    sink = None
    try:
        with sigterm_as_interrupt():
            _copy_tree(Path(job.prepared.src_dir), job.bdir)
            t_copy = time.monotonic() - t0
            (job.bdir / COMPILER_FILE).unlink(missing_ok=True)
            sink = LogSink(job.log, quiet=job.quiet)
            t_run0 = time.monotonic()
            rc = _configure_make(job, sink)
            t_run = time.monotonic() - t_run0
            sink.close()
            if rc != 0:
                sink.show_tail()
                raise BuildError(f"build of {job.recipe.name} with {job.builder} failed "
                                 f"(exit {rc})", hint=f"full log: {job.log}; build tree: "
                                                      f"{job.bdir}")
            manifest = _manifest(job, t0, {"copy": round(t_copy, 3), "run": round(t_run, 3),
                                           **read_phases(job.bdir)})
            collect.completed_stamp(job.bdir).write(job.inputs, {"out": str(job.out)})
            manifest = collect.collect(job.recipe, job.builder, job.bdir, job.out, manifest,
                                       lambda elves: _deps(job, manifest, elves))
    finally:
        if sink is not None:
            sink.close()
    ui.info(f"[green]built[/green] {job.recipe.name} ({job.builder}) in "
            f"{time.monotonic() - t0:.0f} s: {len(manifest['artifacts'])} artifact(s) in "
            f"{job.out}")
    return BuildResult(job.out, manifest, False)


def _configure_make(job: _Job, sink: LogSink) -> int:
    env = {**job.env, "SOURCE_DATE_EPOCH": str(source_date_epoch(job.bdir)), "HOME": "/tmp",
           "LC_ALL": "C"}
    configure = with_prefix_map(job.configure, job.bdir)
    if job.builder == "native":
        return run_native(job.bdir, [configure, job.make], env, sink, job.timeout, PHASES)
    env.update({"CCACHE_DIR": CCACHE_DIR, "PATH": CONTAINER_PATH})
    assert job.image_ref is not None
    return run_in_container(job.client, job.image_ref, _script(configure, job.make),
                            workdir=job.bdir, binds=build_binds(job.bdir), env=env, sink=sink,
                            name=job.name, timeout=job.timeout)


def _manifest(job: _Job, t0: float, timings: dict[str, float]) -> dict[str, Any]:
    cfile = job.bdir / COMPILER_FILE
    return {
        "recipe": job.recipe.name, "recipe_sha256": job.recipe.sha256, "builder": job.builder,
        "flavour": "debug" if job.flavour.endswith(DEBUG_SUFFIX) else "release",
        "image": job.image_ref, "image_id": job.image_id,
        "source_sha256": job.prepared.source_sha256,
        "patches": [{"name": p["name"], "sha256": p["sha256"]} for p in job.prepared.patches],
        "configure_args": job.configure, "make": job.make, "cflags": job.inputs["cflags"],
        "env": job.env,
        "compiler": cfile.read_text(errors="replace").strip() if cfile.is_file() else "",
        "config": read_build_config(job.bdir), "build_dir": str(job.bdir), "log": str(job.log),
        "inputs_sha256": json_sha256(job.inputs),
        "built_at": utc_stamp(),
        "seconds": round(time.monotonic() - t0, 1),
        # where the time went (seconds): copy (the tree), run (configure + make in the builder)
        # split into configure and make, then deps and collect (kvmlab.build.collect)
        "timings": timings,
    }


def _deps(job: _Job, manifest: dict, elves: list[tuple[str, Path, list[str]]]) -> list[dict]:
    """One ldd + dpkg -S/rpm -qf run where the artifacts were linked."""
    if not elves:
        return []
    t_deps = time.monotonic()
    bins = [str(src) for _, src, _ in elves]
    if job.builder == "native":
        text = deps.deps_native(bins)
    else:
        assert job.image_ref is not None
        text = deps.deps_container(job.client, job.image_ref, job.bdir, bins,
                                   job.settings.work(job.recipe.name) /
                                   f"build-{job.flavour}-deps.log", f"{job.name}-deps")
    manifest["timings"]["deps"] = round(time.monotonic() - t_deps, 3)
    return deps.runtime_deps([(a, n) for a, _, n in elves], text)


def _copy_tree(src: Path, dest: Path) -> None:
    if dest.exists() or dest.is_symlink():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp, symlinks=True)
    os.replace(tmp, dest)


def clean(settings: Settings, recipe: str, builder: str, *, all_work: bool = False) -> list[Path]:
    """Remove the build tree, its log and out/<recipe>/<builder> (keeps caches and the ccache
    volume). all_work also removes work/<recipe> entirely (unpacked source included)."""
    targets = [build_dir(settings, recipe, builder), log_path(settings, recipe, builder),
               settings.out(recipe, builder)]
    if all_work:
        targets.append(settings.work(recipe))
    removed = []
    for t in targets:
        if t.is_dir() and not t.is_symlink():
            shutil.rmtree(t)
            removed.append(t)
        elif t.exists() or t.is_symlink():
            t.unlink()
            removed.append(t)
    return removed
