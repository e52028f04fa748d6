"""The step registry: every lab step once, with what it runs, its checks and whether it is stamped.

``STEPS`` is the one table that kvmlab.lab.runner (the order, what each step runs, which results
are reused), kvmlab.lab.verify and the task layer (which checks verify a step), and
kvmlab.lab.remote (which steps the controller does once for all hosts) read. A step's name is the
task users know (``invoke doctor``, ``invoke boot-test``); ``check`` names the file
kvmlab/checks/test_<check>.py that verifies it (several steps share one: doctor and load-modules
are verified by the host checks). Every step calls the library function of its concern; those
are no-ops when their inputs are unchanged (fetch/patch/build stamps, install manifests).
"""
from __future__ import annotations

import hashlib
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmlab import install
from kvmlab.boot import guest, image, vm
from kvmlab.build import images
from kvmlab.build import qemu as qemu_build
from kvmlab.core.errors import LabError
from kvmlab.core.fsutil import read_json, sha256_file
from kvmlab.core.settings import Settings
from kvmlab.host import doctor as host
from kvmlab.host import verdict
from kvmlab.model.recipe import Recipe, load_recipe
from kvmlab.nested import steps as nested_steps
from kvmlab.nested.record import NestedOptions
from kvmlab.source import fetch, prepare


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
    nested: bool = False           # last step: the nested KVM lab (kvmlab.nested.steps)
    nested_cpu: str = "max"


@dataclass
class StepOutcome:
    step: str
    status: str                    # ok / no-op / skipped / failed
    seconds: float = 0.0
    figure: str = ""               # the key figure shown in the summary
    record: dict[str, Any] = field(default_factory=dict)  # what goes into the lock


class Ctx:
    """What the steps share during one run."""

    def __init__(self, settings: Settings, opts: LabOptions):
        self.s, self.o = settings, opts
        self.recipe: Recipe = load_recipe(settings.recipes_dir, opts.recipe)
        self.records: dict[str, dict[str, Any]] = {}
        self.qemu: Path | None = None
        self.prepared: prepare.PreparedSource | None = None   # the patch step's tree, for build
        self.disk: Path = settings.state_dir / "lab" / f"{opts.recipe}-disk.qcow2"


# ---------------------------------------------------------------------------------------------
# what the steps run


def _fetch(c: Ctx) -> StepOutcome:
    r = fetch.fetch_source(c.s, c.recipe, source=c.o.source, offline=c.o.offline)
    return StepOutcome("fetch", "ok" if r.status == "downloaded" else "no-op",
                       figure=f"{r.status}, sha256 {r.sha256[:12]} ({r.check})",
                       record={"file": r.file, "sha256": r.sha256, "kind": r.kind})


def _patch(c: Ctx) -> StepOutcome:
    p = prepare.prepare(c.s, c.recipe, c.o.builder, source=c.o.source, offline=c.o.offline)
    c.prepared = p
    return StepOutcome("patch", "no-op" if p.noop else "ok", figure=f"{len(p.patches)} patch(es)",
                       record={"patches": p.patches, "source_sha256": p.source_sha256})


def _images(c: Ctx) -> StepOutcome:
    if c.o.builder == "native":
        return StepOutcome("images", "skipped", figure="native builder: no image")
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


def _build(c: Ctx) -> StepOutcome:
    # the tree the patch step prepared: not fetched, hashed and checked a second time
    r = qemu_build.build(c.s, c.recipe, c.o.builder, jobs=c.o.jobs, source=c.o.source,
                         offline=c.o.offline, prepared=c.prepared)
    m = r.manifest
    arts = {a["path"]: a["sha256"] for a in m.get("artifacts", [])}
    return StepOutcome("build", "no-op" if r.noop else "ok",
                       figure=f"{len(arts)} artifacts in {r.out_dir}",
                       record={"image_id": m.get("image_id"), "compiler": m.get("compiler"),
                               "configure_args": m.get("configure_args"), "artifacts": arts,
                               "config": m.get("config")})


def _install(c: Ctx) -> StepOutcome:
    r = install.install(c.s, c.recipe, c.o.builder, prefix=c.o.prefix, destdir=c.o.destdir,
                        install_deps=c.o.install_deps)
    c.qemu = install.binary_path(c.recipe, Path(r.root))
    return StepOutcome("install", "no-op" if r.noop else "ok",
                       figure=f"{len(r.rows)} file(s) under {r.root}",
                       record={"manifest": str(r.manifest_path), "root": str(r.root)})


def _install_bios(c: Ctx) -> StepOutcome:
    r = install.install_bios(c.s, c.recipe, c.o.builder, prefix=c.o.prefix, destdir=c.o.destdir)
    dirs = [str(d) for d in r.search.dirs]
    return StepOutcome("install-bios", "no-op" if r.noop else "ok",
                       figure=f"{len(r.rows)} file(s) -> {', '.join(dirs)}",
                       record={"manifest": str(r.manifest_path) if r.manifest_path else None,
                               "search_dirs": dirs, "proof": bool(r.proof and r.proof.ok)})


def _load_modules(c: Ctx) -> StepOutcome:
    try:
        r = host.load_modules()
    except host.ModulesUnsupported:
        # nothing can be loaded on this kernel; whether KVM is usable is the doctor's verdict
        kvm = "kvm is built in (/dev/kvm present)" if Path("/dev/kvm").exists() else \
            "and no /dev/kvm: guests will run under TCG"
        return StepOutcome("load-modules", "skipped",
                           figure=f"kernel has no loadable-module support; {kvm}")
    return StepOutcome("load-modules", "ok", figure=r.summary[:80])


def _doctor(c: Ctx) -> StepOutcome:
    rep = host.doctor()
    verdict.write_record(c.s.state_dir, rep, "lab")   # the last verdict, for `status`
    facts = rep.facts()
    # the doctor's table too (what `doctor --json` shows), for the report
    checks = [{"name": c.name, "status": c.shown_status, "value": c.value,
               "explanation": c.explanation, "hint": c.hint} for c in rep.checks]
    return StepOutcome("doctor", "ok", figure=facts.get("verdict", ""),
                       record={"facts": facts, "checks": checks})


def _create_image(c: Ctx) -> StepOutcome:
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


def _guest(c: Ctx) -> StepOutcome:
    g = guest.make_guest(c.s, c.o.guest)
    return StepOutcome("guest", "no-op" if g.cached else "ok", figure=f"{g.kind} in {g.dir}",
                       record={"kind": g.kind, "inputs": g.inputs})


def _boot_qemu(c: Ctx) -> Path:
    if c.o.qemu:
        return Path(c.o.qemu)
    if c.qemu is None:
        c.qemu = install.installed_qemu(c.s, c.o.prefix)
    if c.qemu is None:
        raise LabError("no installed qemu to boot", hint="run the install step or pass --qemu")
    return c.qemu


def _boot_test(c: Ctx) -> StepOutcome:
    r = vm.boot_test(c.s, qemu=_boot_qemu(c), accel=c.o.accel, guest=c.o.guest,
                     disk=c.disk if c.disk.exists() else None, timeout=c.o.timeout)
    vm.write_last(c.s, [r])  # for `invoke verify --step boot`
    rec = {"guest": r.guest, "booted": r.booted, "accel": r.accel, "qemu_version": r.qemu_version,
           "accel_reason": r.accel_reason, "kvm_exits": r.kvm_exits}
    if not r.booted:
        raise LabError(f"boot-test: {r.guest} guest did not boot: {r.failure}",
                       hint=f"serial log kept at {r.serial_log}:\n{r.serial_tail(10)}")
    secs = f"{r.seconds:.2f}s" if r.seconds is not None else "?"
    return StepOutcome("boot-test", "ok", figure=f"{r.guest}: booted under {r.accel} in {secs}",
                       record=rec)


def _nested(c: Ctx) -> StepOutcome:
    """`lab --nested`: this recipe's build boots the tiny guest under KVM inside a lab VM with
    the kvm-kmod modules we built loaded (kvmlab.nested.steps); the record goes into the lock."""
    if not c.o.nested:
        return StepOutcome("nested", "skipped", figure="without --nested")
    o = NestedOptions(qemu_recipe=c.recipe.name, builder=c.o.builder, cpu=c.o.nested_cpu)
    rec = nested_steps.run_nested(c.s, o)
    return StepOutcome("nested", "ok",
                       figure=f"{rec.kernel.get('release')}: {rec.verdict}, nested boot under "
                              f"{rec.accel} ({rec.kvm_exits} KVM exits) in "
                              f"{rec.times.total:.0f}s", record=rec.lock_entry())


def _installed_files(manifest_path: Path) -> dict[str, str]:
    m = read_json(manifest_path, {}) or {}
    return {e["path"]: e.get("sha256", "") for e in m.get("files", []) if e.get("sha256")}


def installed_map(records: dict[str, dict[str, Any]]) -> dict[str, str]:
    """path -> sha256 of every file the install steps of a run recorded in their manifests."""
    files: dict[str, str] = {}
    for step in ("install", "install-bios"):
        mp = records.get(step, {}).get("manifest")
        if mp:
            files.update(_installed_files(Path(mp)))
    return dict(sorted(files.items()))


# ---------------------------------------------------------------------------------------------
# the inputs of the stamped steps: their result is reused while these are unchanged


def _doctor_inputs(c: Ctx) -> dict[str, Any] | None:
    return {"kernel": platform.release(), "machine": platform.machine(),
            "dev_kvm": _file_sig("/dev/kvm"), "cpuinfo": _file_sig("/proc/cpuinfo", content=True)}


def _boot_test_inputs(c: Ctx) -> dict[str, Any] | None:
    try:
        q = _boot_qemu(c)
    except LabError:
        return None  # nothing to boot: the step runs (and says so)
    return {"qemu": str(q), "qemu_sha256": sha256_file(q) if q.exists() else "-",
            "accel": c.o.accel, "guest": c.o.guest, "guest_record": c.records.get("guest", {}),
            "firmware": c.records.get("install-bios", {})}


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
# the registry


@dataclass(frozen=True)
class Step:
    name: str                                   # the task users know: invoke <name>
    run: Callable[[Ctx], StepOutcome]
    check: str | None = None                    # kvmlab/checks/test_<check>.py verifies it
    # stamped: its result is reused (kvmlab.core.stamps) while these inputs are unchanged
    inputs: Callable[[Ctx], dict[str, Any] | None] | None = None
    controller: bool = False                    # lab --hosts: done once, on the controller

    @property
    def stamped(self) -> bool:
        return self.inputs is not None


STEPS: tuple[Step, ...] = (
    Step("fetch", _fetch, check="fetch", controller=True),
    Step("patch", _patch, check="patch", controller=True),
    Step("images", _images, controller=True),
    Step("build", _build, check="build", controller=True),
    Step("install", _install, check="install"),
    Step("install-bios", _install_bios, check="install"),
    Step("load-modules", _load_modules, check="host"),
    Step("doctor", _doctor, check="host", inputs=_doctor_inputs),
    Step("create-image", _create_image),
    Step("guest", _guest),
    Step("boot-test", _boot_test, check="boot", inputs=_boot_test_inputs),
    # its checks run against the lab VM while it is up (kvmlab/checks/test_nested.py)
    Step("nested", _nested),
)
NAMES: tuple[str, ...] = tuple(s.name for s in STEPS)
CONTROLLER_STEPS: tuple[str, ...] = tuple(s.name for s in STEPS if s.controller)


def get(name: str) -> Step:
    for s in STEPS:
        if s.name == name:
            return s
    raise LabError(f"unknown step {name!r}", hint="steps: " + ", ".join(NAMES))


def checks_of_run() -> tuple[str, ...]:
    """The check files that verify a whole lab run, in the flow's order, each once."""
    return tuple(dict.fromkeys(s.check for s in STEPS if s.check))


def check_of(name: str) -> str:
    """The check file name for a step (``doctor`` -> ``host``); a name that is no step (a check
    file's own name, e.g. ``host`` or ``kmod``) is returned as it is."""
    for s in STEPS:
        if s.name == name:
            return s.check or name
    return name
