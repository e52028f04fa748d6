"""lab: the whole pipeline on one host, recorded in lab.lock.json so it can be repeated and compared.

Steps (data, in order): fetch -> patch -> images -> build -> install -> install-bios -> load-modules
-> doctor -> create-image -> guest -> boot-test. Every step calls the library function of its
concern; those are no-ops when their inputs are unchanged (fetch/patch/build stamps, install
manifests). The expensive host-side steps (doctor, boot-test) are skipped when their recorded inputs
are unchanged and they passed last time. The run stops at the first failing step with its own clear
error; ``resume`` continues from there. On success the lock records every input and result;
``check`` recomputes them (re-hashing installed files) and reports every difference.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvmlab.core import ui
from kvmlab.core.errors import HostError, KvmlabError, LabError
from kvmlab.core.fsutil import atomic_write_json, json_sha256, read_json, sha256_file
from kvmlab.core.settings import Settings
from kvmlab.model.recipe import Recipe, load_recipe

LOCK_SCHEMA = 1
STEPS = ("fetch", "patch", "images", "build", "install", "install-bios", "load-modules",
         "doctor", "create-image", "guest", "boot-test")


@dataclass(frozen=True)
class LabOptions:
    recipe: str
    builder: str
    accel: str = "auto"
    prefix: str | None = None
    destdir: str | None = None
    source: str | None = None
    offline: bool = False
    jobs: int = 2
    guest: str = "tiny"
    qemu: str | None = None        # boot-test with this qemu instead of the installed one
    disk_size: str = "1G"
    force: bool = False
    skip: tuple[str, ...] = ()
    timeout: float | None = None   # boot-test timeout
    install_deps: bool = False     # install: apt-get the runtime libraries the host lacks


@dataclass
class StepOutcome:
    step: str
    status: str                    # ok / no-op / skipped / failed
    seconds: float = 0.0
    figure: str = ""               # the key figure shown in the summary
    record: dict[str, Any] = field(default_factory=dict)  # what goes into the lock


@dataclass
class LabResult:
    outcomes: list[StepOutcome]
    lock_path: Path | None
    failed: StepOutcome | None = None
    error: KvmlabError | None = None


class _Ctx:
    """What the steps share during one run."""

    def __init__(self, settings: Settings, opts: LabOptions, state: dict[str, Any]):
        self.s, self.o, self.state = settings, opts, state
        self.recipe: Recipe = load_recipe(settings.recipes_dir, opts.recipe)
        self.records: dict[str, dict[str, Any]] = {}
        self.qemu: Path | None = None
        self.disk: Path = settings.state_dir / "lab" / f"{opts.recipe}-disk.qcow2"


# ---------------------------------------------------------------------------------------------
# the steps


def _fetch(c: _Ctx) -> StepOutcome:
    from kvmlab.source import fetch
    r = fetch.fetch_source(c.s, c.recipe, source=c.o.source, offline=c.o.offline)
    return StepOutcome("fetch", "ok" if r.status == "downloaded" else "no-op",
                       figure=f"{r.status}, sha256 {r.sha256[:12]} ({r.check})",
                       record={"file": r.file, "sha256": r.sha256, "kind": r.kind})


def _patch(c: _Ctx) -> StepOutcome:
    from kvmlab.source import prepare as pipeline
    p = pipeline.prepare(c.s, c.recipe, c.o.builder, source=c.o.source, offline=c.o.offline)
    return StepOutcome("patch", "no-op" if p.noop else "ok", figure=f"{len(p.patches)} patch(es)",
                       record={"patches": p.patches, "source_sha256": p.source_sha256})


def _images(c: _Ctx) -> StepOutcome:
    if c.o.builder == "native":
        return StepOutcome("images", "skipped", figure="native builder: no image")
    from kvmlab.build import images
    name = c.recipe.builder(c.o.builder).image or c.o.builder
    built = read_json(c.s.out(c.recipe.name, c.o.builder) / "manifest.json", {}) or {}
    if built.get("image") and images.local_base_name(images.docker_dir(c.s, name) / "Dockerfile"):
        # the image's tag is a hash of its inputs, known without docker: when the last build
        # used exactly this image, there is nothing to check or make (saves the docker round trip)
        repo, tag = images.image_ref(c.s, name)
        if built["image"] == f"{repo}:{tag}":
            return StepOutcome("images", "no-op", figure=f"{repo}:{tag} (as built)",
                               record={"ref": built["image"], "id": built.get("image_id")})
    info = images.ensure_image(c.s, name)
    return StepOutcome("images", "no-op" if info.noop else "ok", figure=info.ref,
                       record={"ref": info.ref, "id": info.id})


def _build(c: _Ctx) -> StepOutcome:
    from kvmlab.build import qemu as build
    r = build.build(c.s, c.recipe, c.o.builder, jobs=c.o.jobs, source=c.o.source,
                    offline=c.o.offline)
    m = r.manifest
    arts = {a["path"]: a["sha256"] for a in m.get("artifacts", [])}
    return StepOutcome("build", "no-op" if r.noop else "ok",
                       figure=f"{len(arts)} artifacts in {r.out_dir}",
                       record={"image_id": m.get("image_id"), "compiler": m.get("compiler"),
                               "configure_args": m.get("configure_args"), "artifacts": arts,
                               "config": m.get("config")})


def _installed_files(manifest_path: Path) -> dict[str, str]:
    m = read_json(manifest_path, {}) or {}
    return {e["path"]: e.get("sha256", "") for e in m.get("files", []) if e.get("sha256")}


def _install(c: _Ctx) -> StepOutcome:
    from kvmlab import install
    r = install.install(c.s, c.recipe, c.o.builder, prefix=c.o.prefix, destdir=c.o.destdir,
                        install_deps=c.o.install_deps)
    c.qemu = install.binary_path(c.recipe, Path(r.root))
    return StepOutcome("install", "no-op" if r.noop else "ok",
                       figure=f"{len(r.rows)} file(s) under {r.root}",
                       record={"manifest": str(r.manifest_path), "root": str(r.root)})


def _install_bios(c: _Ctx) -> StepOutcome:
    from kvmlab import install
    r = install.install_bios(c.s, c.recipe, c.o.builder, prefix=c.o.prefix, destdir=c.o.destdir)
    dirs = [str(d) for d in r.search.dirs]
    return StepOutcome("install-bios", "no-op" if r.noop else "ok",
                       figure=f"{len(r.rows)} file(s) -> {', '.join(dirs)}",
                       record={"manifest": str(r.manifest_path) if r.manifest_path else None,
                               "search_dirs": dirs, "proof": bool(r.proof and r.proof.ok)})


def _load_modules(c: _Ctx) -> StepOutcome:
    from kvmlab.host import doctor as host
    try:
        r = host.load_modules()
    except HostError as e:
        unsupported = getattr(host, "ModulesUnsupported", None)
        if not (unsupported and isinstance(e, unsupported)):
            raise
        # nothing can be loaded on this kernel; whether KVM is usable is the doctor's verdict
        kvm = "kvm is built in (/dev/kvm present)" if Path("/dev/kvm").exists() else \
            "and no /dev/kvm: guests will run under TCG"
        return StepOutcome("load-modules", "skipped",
                           figure=f"kernel has no loadable-module support; {kvm}")
    return StepOutcome("load-modules", "ok", figure=str(getattr(r, "summary", r))[:80])


def _doctor(c: _Ctx) -> StepOutcome:
    from kvmlab.host import doctor as host
    rep = host.doctor()
    facts = rep.facts()
    return StepOutcome("doctor", "ok", figure=facts.get("verdict", ""), record={"facts": facts})


def _create_image(c: _Ctx) -> StepOutcome:
    from kvmlab.boot import image
    try:
        near = _boot_qemu(c)
    except LabError:
        near = None
    qemu_img = image.find_qemu_img(c.s, near=near)  # the qemu-img that goes with the boot qemu
    if c.disk.exists():
        info = image.image_info(c.disk, qemu_img)
        want = image.parse_size(c.o.disk_size)
        if info.format == "qcow2" and info.virtual_size == want:
            return StepOutcome("create-image", "no-op", figure=f"{c.disk} ({c.o.disk_size})",
                               record={"format": info.format, "virtual_size": info.virtual_size})
        raise LabError(f"{c.disk} exists but is {info.format}, {info.virtual_size} bytes",
                       hint="remove it (lab never overwrites a disk image)")
    c.disk.parent.mkdir(parents=True, exist_ok=True)
    r = image.create_image(c.disk, c.o.disk_size, "qcow2", qemu_img=qemu_img, settings=c.s)
    return StepOutcome("create-image", "ok", figure=f"{c.disk} ({c.o.disk_size})",
                       record={"format": r.format, "virtual_size": r.virtual_size})


def _guest(c: _Ctx) -> StepOutcome:
    from kvmlab.boot import guest
    g = guest.make_guest(c.s, c.o.guest)
    return StepOutcome("guest", "no-op" if g.cached else "ok", figure=f"{g.kind} in {g.dir}",
                       record={"kind": g.kind, "inputs": g.inputs})


def _boot_qemu(c: _Ctx) -> Path:
    if c.o.qemu:
        return Path(c.o.qemu)
    if c.qemu is None:
        from kvmlab import install
        c.qemu = install.installed_qemu(c.s, c.o.prefix)
    if c.qemu is None:
        raise LabError("no installed qemu to boot", hint="run the install step or pass --qemu")
    return c.qemu


def _boot_test(c: _Ctx) -> StepOutcome:
    from kvmlab.boot import vm
    r = vm.boot_test(c.s, qemu=_boot_qemu(c), accel=c.o.accel, guest=c.o.guest,
                     disk=c.disk if c.disk.exists() else None, timeout=c.o.timeout)
    vm.write_last(c.s, [r])  # for `invoke verify --step boot`
    rec = {"guest": r.guest, "booted": r.booted, "accel": r.accel, "qemu_version": r.qemu_version,
           "accel_reason": r.accel_reason}
    if not r.booted:
        raise LabError(f"boot-test: {r.guest} guest did not boot: {r.failure}",
                       hint=f"serial log kept at {r.serial_log}:\n{r.serial_tail(10)}")
    secs = f"{r.seconds:.2f}s" if r.seconds is not None else "?"
    return StepOutcome("boot-test", "ok", figure=f"{r.guest}: booted under {r.accel} in {secs}",
                       record=rec)


STEP_FUNCS: dict[str, Callable[[_Ctx], StepOutcome]] = {
    "fetch": _fetch, "patch": _patch, "images": _images, "build": _build, "install": _install,
    "install-bios": _install_bios, "load-modules": _load_modules, "doctor": _doctor,
    "create-image": _create_image, "guest": _guest, "boot-test": _boot_test,
}
# Steps whose result is reused when their inputs are unchanged and they passed last time.
CACHED_STEPS = {"doctor", "boot-test"}


def _inputs_hash(c: _Ctx, step: str) -> str | None:
    """Cheap inputs of the cached steps; None means 'always run'."""
    if step == "doctor":
        facts = [platform.release(), platform.machine(), _file_sig("/dev/kvm"),
                 _file_sig("/proc/cpuinfo", content=True)]
    elif step == "boot-test":
        try:
            q = _boot_qemu(c)
        except LabError:
            return None
        facts = [str(q), sha256_file(q) if q.exists() else "-", c.o.accel, c.o.guest,
                 json.dumps(c.records.get("guest", {}), sort_keys=True, default=str),
                 json.dumps(c.records.get("install-bios", {}), sort_keys=True, default=str)]
    else:
        return None
    return hashlib.sha256("\0".join(facts).encode()).hexdigest()


def _file_sig(path: str, content: bool = False) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return f"{path}:absent"
    if content:
        try:
            with open(path, "rb") as f:
                # only the stable part: flags/model lines (MHz changes constantly)
                lines = [ln for ln in f.read().decode(errors="replace").splitlines()
                         if ln.startswith(("vendor_id", "model name", "flags"))]
            return hashlib.sha256("\n".join(sorted(set(lines))).encode()).hexdigest()
        except OSError:
            return f"{path}:unreadable"
    return f"{path}:{st.st_mode:o}:{st.st_rdev}"


# ---------------------------------------------------------------------------------------------
# state, lock


def state_path(settings: Settings) -> Path:
    return settings.state_dir / "lab" / "state.json"


def lock_path(settings: Settings) -> Path:
    return settings.state_dir / "lab.lock.json"


def _options_key(opts: LabOptions) -> str:
    d = asdict(opts)
    d.pop("force", None)
    d.pop("install_deps", None)   # how missing libraries get there does not change the result
    return json_sha256(d)


def run_lab(settings: Settings, opts: LabOptions, *, resume: bool = False,
            on_step: Callable[[str], None] | None = None) -> LabResult:
    """Run the pipeline; never raises for a failing step (the result carries it)."""
    for s in opts.skip:
        if s not in STEPS:
            raise LabError(f"unknown step {s!r} in --skip", hint="steps: " + ", ".join(STEPS))
    if opts.source:
        from kvmlab.source.fetch import check_source
        check_source(opts.source, load_recipe(settings.recipes_dir, opts.recipe))
    state = read_json(state_path(settings), {}) or {}
    key = _options_key(opts)
    if resume and state.get("options") != key:
        raise LabError("nothing to resume with these options",
                       hint="run `invoke lab` (the last run used other options or succeeded)")
    c = _Ctx(settings, opts, state)
    done: dict[str, Any] = state.get("done", {}) if resume else {}
    cached: dict[str, Any] = state.get("cached", {})
    outcomes: list[StepOutcome] = []
    result = LabResult(outcomes, None)
    for step in STEPS:
        if step in opts.skip:
            outcomes.append(StepOutcome(step, "skipped", figure="--skip"))
            continue
        if on_step:
            on_step(step)
        t0 = time.monotonic()
        if resume and step in done:
            c.records[step] = done[step]["record"]
            outcomes.append(StepOutcome(step, "no-op", figure="done before --resume",
                                        record=done[step]["record"]))
            if step == "install":
                from kvmlab import install
                c.qemu = install.binary_path(c.recipe, Path(done[step]["record"]["root"]))
            continue
        ih = _inputs_hash(c, step) if step in CACHED_STEPS else None
        prev = cached.get(step)
        if ih and prev and prev.get("inputs") == ih and not opts.force:
            out = StepOutcome(step, "no-op", figure=prev.get("figure", "") + " (unchanged)",
                              record=prev["record"])
        else:
            try:
                out = STEP_FUNCS[step](c)
            except KvmlabError as e:
                out = StepOutcome(step, "failed", time.monotonic() - t0, figure=e.message[:100])
                outcomes.append(out)
                result.failed, result.error = out, e
                _save_state(settings, {"options": key, "done": done, "failed": step,
                                       "cached": cached})
                return result
            if ih:
                cached[step] = {"inputs": ih, "record": out.record, "figure": out.figure}
        out.seconds = time.monotonic() - t0
        outcomes.append(out)
        c.records[step] = out.record
        done[step] = {"record": out.record}
        _save_state(settings, {"options": key, "done": done, "failed": None, "cached": cached})
    lock = make_lock(c)
    atomic_write_json(lock_path(settings), lock)
    result.lock_path = lock_path(settings)
    return result


def _save_state(settings: Settings, state: dict[str, Any]) -> None:
    atomic_write_json(state_path(settings), state)


def _installed_map(c: _Ctx) -> dict[str, str]:
    files: dict[str, str] = {}
    for step in ("install", "install-bios"):
        mp = c.records.get(step, {}).get("manifest")
        if mp:
            files.update(_installed_files(Path(mp)))
    return dict(sorted(files.items()))


def make_lock(c: _Ctx) -> dict[str, Any]:
    r = c.records
    return {
        "schema": LOCK_SCHEMA,
        "host": platform.node(),
        "recipe": {"name": c.recipe.name, "version": c.recipe.version, "sha256": c.recipe.sha256},
        "builder": c.o.builder,
        "source": r.get("fetch", {}),
        "patches": r.get("patch", {}).get("patches", []),
        "image": r.get("images", {}),
        "build": r.get("build", {}),
        "installed": _installed_map(c),
        "firmware_dirs": r.get("install-bios", {}).get("search_dirs", []),
        "host_facts": r.get("doctor", {}).get("facts", {}),
        "boot": r.get("boot-test", {}),
        "manifests": {k: r.get(k, {}).get("manifest") for k in ("install", "install-bios")},
        "options": {k: v for k, v in asdict(c.o).items() if k not in ("force",)},
    }


# ---------------------------------------------------------------------------------------------
# check: compare the lock with what is on this host now


@dataclass
class Difference:
    key: str
    locked: str
    now: str


def _flatten(d: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(d, list):
        out[prefix] = json.dumps(d, sort_keys=True, default=str)
    else:
        out[prefix] = "" if d is None else str(d)
    return out


def current_facts(settings: Settings, lock: dict[str, Any], *, host_facts: bool = True
                  ) -> dict[str, Any]:
    """Recompute, without building or installing, what the lock records."""
    from kvmlab.source import prepare as pipeline
    recipe = load_recipe(settings.recipes_dir, lock["recipe"]["name"])
    builder = lock["builder"]
    now: dict[str, Any] = {"recipe": {"name": recipe.name, "version": recipe.version,
                                      "sha256": recipe.sha256}}
    stamp = pipeline.read_patch_stamp(settings, recipe) or {}
    now["patches"] = stamp.get("patches", [])
    m = read_json(settings.out(recipe.name, builder) / "manifest.json", {}) or {}
    now["build"] = {"image_id": m.get("image_id"), "compiler": m.get("compiler"),
                    "configure_args": m.get("configure_args"), "config": m.get("config"),
                    "artifacts": {a["path"]: a["sha256"] for a in m.get("artifacts", [])}}
    installed: dict[str, str] = {}
    for path in lock.get("installed", {}):
        p = Path(path)
        installed[path] = sha256_file(p) if p.is_file() else ("missing" if not p.exists()
                                                             else "not a file")
    now["installed"] = installed
    if host_facts:
        from kvmlab.host import doctor as host
        now["host_facts"] = host.doctor().facts()
    return now


def check(settings: Settings, *, host_facts: bool = True) -> list[Difference]:
    lp = lock_path(settings)
    lock = read_json(lp, None)
    if not lock:
        raise LabError(f"no lab lock at {lp}", hint="run `invoke lab` first")
    now = current_facts(settings, lock, host_facts=host_facts)
    diffs: list[Difference] = []
    for section, val in now.items():
        a, b = _flatten(lock.get(section, {}), section), _flatten(val, section)
        for k in sorted(set(a) | set(b)):
            if a.get(k, "(absent)") != b.get(k, "(absent)"):
                diffs.append(Difference(k, a.get(k, "(absent)"), b.get(k, "(absent)")))
    return diffs


def print_summary(result: LabResult) -> None:
    ui.table("lab", ["step", "status", "time", "key figure"],
             [(o.step, o.status, f"{o.seconds:.2f}s", o.figure) for o in result.outcomes])


# Steps whose testinfra checks run at the end of a lab run (kvmlab/checks/test_<step>.py).
VERIFIED_STEPS = ("fetch", "patch", "build", "install", "host", "boot")


def verify_env(result: LabResult) -> dict[str, str]:
    """What the infra checks need to know about this run (KVMLAB_VERIFY_*)."""
    env: dict[str, str] = {}
    for o in result.outcomes:
        if o.step == "install" and o.record.get("manifest"):
            env["KVMLAB_VERIFY_INSTALL_MANIFEST"] = o.record["manifest"]
    return env


def repro_check(settings: Settings, recipe: str, builder: str, *, source: str | None = None,
                jobs: int = 2) -> list[tuple[str, str, str]]:
    """Build the recipe twice from scratch, each in its own state dir (so in different build
    directories), sharing only the download cache; return (artifact, sha1st, sha2nd) rows."""
    import dataclasses
    import shutil
    import tempfile

    from kvmlab.build import qemu as build
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="kvmlab-repro-", dir=settings.state_dir))
    try:
        manifests = []
        for i in (1, 2):
            s_i = dataclasses.replace(settings, state_dir=base / f"run{i}")
            r = build.build(s_i, recipe, builder, jobs=jobs, source=source, force=True)
            manifests.append({a["path"]: a["sha256"] for a in r.manifest.get("artifacts", [])})
        a, b = manifests
        return [(p, a.get(p, "missing"), b.get(p, "missing")) for p in sorted(set(a) | set(b))]
    finally:
        shutil.rmtree(base, ignore_errors=True)
