"""lab: the whole pipeline on one host, recorded in lab.lock.json to be repeated and compared.

The steps, their order and what each runs are kvmlab.lab.steps.STEPS. The stamped host-side
steps (doctor, boot-test) are skipped when their recorded inputs are unchanged and they passed
last time (kvmlab.core.stamps). The run stops at the first failing step with its own clear
error; ``resume`` continues from there. On success the lock records every input and result;
``check`` recomputes them (re-hashing installed files) and reports every difference.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvmlab import install
from kvmlab.build import qemu as qemu_build
from kvmlab.core import ui
from kvmlab.core.errors import KvmlabError, LabError
from kvmlab.core.fsutil import atomic_write_json, json_sha256, read_json, sha256_file
from kvmlab.core.records import to_jsonable
from kvmlab.core.settings import Settings
from kvmlab.core.stamps import Stamp
from kvmlab.host import doctor as host
from kvmlab.lab import runlog, steps
from kvmlab.lab.steps import Ctx, LabOptions, StepOutcome
from kvmlab.model.manifests import BuildManifest, LabLock
from kvmlab.model.recipe import load_recipe
from kvmlab.source import fetch, prepare

__all__ = ["LabOptions", "LabResult", "StepOutcome", "check", "lock_path", "run_lab"]

LOCK_SCHEMA = 1


@dataclass
class LabResult:
    outcomes: list[StepOutcome]
    lock_path: Path | None
    failed: StepOutcome | None = None
    error: KvmlabError | None = None

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)


# ---------------------------------------------------------------------------------------------
# state, stamps, lock


def state_path(settings: Settings) -> Path:
    return settings.state_dir / "lab" / "state.json"


def lock_path(settings: Settings) -> Path:
    return settings.state_dir / "lab.lock.json"


def stamp(settings: Settings, step: str) -> Stamp:
    """The record of a stamped step's last passing result (kvmlab.core.stamps)."""
    return Stamp(settings.state_dir / "lab" / f"{step}.stamp.json", f"lab {step}")


def _options_key(opts: LabOptions) -> str:
    d = asdict(opts)
    d.pop("force", None)
    d.pop("install_deps", None)   # how missing libraries get there does not change the result
    return json_sha256(d)


class _Run:
    """One run_lab: the context, the resume state and what has been done so far."""

    def __init__(self, settings: Settings, opts: LabOptions, resume: bool):
        state = read_json(state_path(settings), {}) or {}
        self.key = _options_key(opts)
        if resume and state.get("options") != self.key:
            raise LabError("nothing to resume with these options",
                           hint="run `invoke lab` (the last run used other options or succeeded)")
        self.s, self.o, self.resume = settings, opts, resume
        self.c = Ctx(settings, opts)
        self.done: dict[str, Any] = state.get("done", {}) if resume else {}
        self.result = LabResult([], None)

    def save(self, failed: str | None) -> None:
        atomic_write_json(state_path(self.s), {"options": self.key, "done": self.done,
                                               "failed": failed})

    def resumed(self, step: steps.Step) -> StepOutcome | None:
        """The outcome recorded before --resume, or None when the step has to run."""
        if not (self.resume and step.name in self.done):
            return None
        record = self.done[step.name]["record"]
        if step.name == "install":
            self.c.qemu = install.binary_path(self.c.recipe, Path(record["root"]))
        return StepOutcome(step.name, "no-op", figure="done before --resume", record=record)

    def execute(self, step: steps.Step) -> StepOutcome:
        """Run the step, or reuse its stamped result while its inputs are unchanged."""
        inputs = step.inputs(self.c) if step.inputs else None
        st = stamp(self.s, step.name)
        prev = st.fresh(inputs) if inputs is not None and not self.o.force else None
        if prev is not None:
            return StepOutcome(step.name, "no-op", figure=prev["figure"] + " (unchanged)",
                               record=prev["record"])
        out = step.run(self.c)
        if inputs is not None:
            st.write(inputs, {"record": out.record, "figure": out.figure})
        return out


def run_lab(settings: Settings, opts: LabOptions, *, resume: bool = False,
            on_step: Callable[[str], None] | None = None) -> LabResult:
    """Run the pipeline; never raises for a failing step (the result carries it)."""
    for name in opts.skip:
        if name not in steps.NAMES:
            raise LabError(f"unknown step {name!r} in --skip",
                           hint="steps: " + ", ".join(steps.NAMES))
    if opts.source:
        fetch.check_source(opts.source, load_recipe(settings.recipes_dir, opts.recipe))
    run = _Run(settings, opts, resume)
    log = runlog.RunLog(settings, opts)   # the timeline, for `invoke report`
    outcomes = run.result.outcomes
    for step in steps.STEPS:
        started = time.time()
        if step.name in opts.skip:
            outcomes.append(StepOutcome(step.name, "skipped", figure="--skip"))
            log.step(outcomes[-1], started)
            continue
        if on_step:
            on_step(step.name)
        t0 = time.monotonic()
        out = run.resumed(step)
        if out is None:
            try:
                out = run.execute(step)
            except KvmlabError as e:
                out = StepOutcome(step.name, "failed", time.monotonic() - t0,
                                  figure=e.message[:100])
                outcomes.append(out)
                run.result.failed, run.result.error = out, e
                run.save(failed=step.name)
                log.step(out, started)
                log.failed(step.name, e)
                return run.result
            out.seconds = time.monotonic() - t0
            run.done[step.name] = {"record": out.record}
            run.save(failed=None)
        outcomes.append(out)
        log.step(out, started)
        run.c.records[step.name] = out.record
    atomic_write_json(lock_path(settings), make_lock(run.c))
    log.finish()
    run.result.lock_path = lock_path(settings)
    return run.result


def make_lock(c: Ctx) -> dict[str, Any]:
    r = c.records
    return LabLock(
        schema=LOCK_SCHEMA, host=platform.node(),
        recipe={"name": c.recipe.name, "version": c.recipe.version, "sha256": c.recipe.sha256},
        builder=c.o.builder, source=r.get("fetch", {}),
        patches=r.get("patch", {}).get("patches", []), image=r.get("images", {}),
        build=r.get("build", {}), installed=steps.installed_map(r),
        firmware_dirs=r.get("install-bios", {}).get("search_dirs", []),
        host_facts=r.get("doctor", {}).get("facts", {}), boot=r.get("boot-test", {}),
        nested=r.get("nested") or None,
        manifests={k: r.get(k, {}).get("manifest") for k in ("install", "install-bios")},
        options={k: v for k, v in asdict(c.o).items() if k not in ("force",)},
    ).to_dict()


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
    recipe = load_recipe(settings.recipes_dir, lock["recipe"]["name"])
    builder = lock["builder"]
    now: dict[str, Any] = {"recipe": {"name": recipe.name, "version": recipe.version,
                                      "sha256": recipe.sha256}}
    stamp = prepare.read_patch_stamp(settings, recipe) or {}
    now["patches"] = stamp.get("patches", [])
    mpath = settings.out(recipe.name, builder) / "manifest.json"
    m = BuildManifest.load(mpath) if mpath.is_file() else None
    now["build"] = {"image_id": m.image_id if m else None, "compiler": m.compiler if m else None,
                    "configure_args": m.get("configure_args") if m else None,
                    "config": m.config if m else None,
                    "artifacts": {a.path: a.sha256 for a in m.artifacts} if m else {}}
    installed: dict[str, str] = {}
    for path in lock.get("installed", {}):
        p = Path(path)
        installed[path] = sha256_file(p) if p.is_file() else ("missing" if not p.exists()
                                                             else "not a file")
    now["installed"] = installed
    if host_facts:
        now["host_facts"] = host.doctor().facts()
    return now


def check(settings: Settings, *, host_facts: bool = True) -> list[Difference]:
    lp = lock_path(settings)
    if not lp.is_file():
        raise LabError(f"no lab lock at {lp}", hint="run `invoke lab` first")
    lock = LabLock.load(lp).to_dict()
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


# The checks run at the end of a lab run (kvmlab/checks/test_<check>.py), from the registry.
VERIFIED_STEPS = steps.checks_of_run()


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
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="kvmlab-repro-", dir=settings.state_dir))
    try:
        manifests = []
        for i in (1, 2):
            s_i = dataclasses.replace(settings, state_dir=base / f"run{i}")
            r = qemu_build.build(s_i, recipe, builder, jobs=jobs, source=source, force=True)
            manifests.append({a["path"]: a["sha256"] for a in r.manifest.get("artifacts", [])})
        a, b = manifests
        return [(p, a.get(p, "missing"), b.get(p, "missing")) for p in sorted(set(a) | set(b))]
    finally:
        shutil.rmtree(base, ignore_errors=True)
