"""What the report shows, read from the records the steps left in the state dir (never written).

- the lab lock (lab.lock.json, kvmlab.model.manifests.LabLock): what the last successful run built
- the last run's timeline, failure and checks (<state>/lab/run.json, kvmlab.lab.runlog)
- every build's phase times (out/<recipe>/<builder>/manifest.json "timings"; kmod builds'
  "seconds"; kvmlab.lab.status.build_manifests)
- every boot-test run kept (<state>/vm/runs/*/result.json, the last boot-test's
  vm/last-boot.json, nested lab runs' <state>/nested/*/record.json): qemu, accelerator, guest,
  time to the marker — grouped for the comparison
- the doctor's facts and table (the lab's doctor stamp, kvmlab.lab.status.doctor_record; the
  lock's host facts when no stamp is left)

A state dir with neither a lab lock nor a run record has nothing to report: one LabError whose
hint is `invoke lab`.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmlab.boot import vm
from kvmlab.core.errors import KvmlabError, LabError
from kvmlab.core.fsutil import read_json
from kvmlab.core.records import to_jsonable
from kvmlab.core.settings import Settings
from kvmlab.lab import runlog, runner, status
from kvmlab.model.manifests import LabLock

# the order phases are drawn in; "run" is configure + make of a build that did not split them
PHASES = ("copy", "prepare", "configure", "make", "run", "deps", "collect")
PHASE_LABELS = {"run": "configure + make", "copy": "copy tree", "prepare": "prepare (kmod)"}
CHECK_STATUSES = ("passed", "failed", "error", "skipped")


@dataclass(frozen=True)
class StepBar:
    step: str
    status: str          # ok / no-op / skipped / failed
    offset: float        # seconds after the run started
    seconds: float
    figure: str


@dataclass(frozen=True)
class BuildPhases:
    name: str            # recipe/builder
    path: str
    built_at: str
    seconds: float | None
    phases: dict[str, float]
    compiler: str = ""
    image: str = ""


@dataclass(frozen=True)
class BootRun:
    qemu: str            # the qemu's version line (its path when unknown)
    accel: str           # what the monitor said; "none" when the VM never got that far
    guest: str
    seconds: float | None  # launch -> marker
    booted: bool
    when: float          # epoch seconds
    failure: str
    source: str          # the record it came from


@dataclass(frozen=True)
class BootGroup:
    qemu: str
    accel: str
    guest: str
    runs: int
    booted: int
    fastest: float | None
    median: float | None
    slowest: float | None


@dataclass(frozen=True)
class CheckRow:
    host: str
    step: str
    name: str
    status: str          # passed / failed / error / skipped
    message: str


@dataclass
class Report:
    state_dir: str
    generated: float
    lock_path: str | None = None
    lock: dict[str, Any] | None = None
    run: dict[str, Any] | None = None       # run.json without its steps and checks
    steps: list[StepBar] = field(default_factory=list)
    builds: list[BuildPhases] = field(default_factory=list)
    boots: list[BootRun] = field(default_factory=list)
    checks: list[CheckRow] | None = None    # None: no checks recorded
    doctor_path: str | None = None
    doctor_facts: dict[str, str] = field(default_factory=dict)
    doctor_checks: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def boot_groups(self) -> list[BootGroup]:
        return group_boots(self.boots)

    def check_counts(self) -> dict[str, int]:
        """How many checks ended in each status; a skipped check is not a passed one."""
        counts = dict.fromkeys(CHECK_STATUSES, 0)
        for c in self.checks or []:
            counts[c.status] = counts.get(c.status, 0) + 1
        return counts

    @property
    def failed(self) -> bool:
        return bool(self.run and self.run.get("failed"))

    def to_dict(self) -> dict[str, Any]:
        d = to_jsonable(self)
        d["boot_groups"] = to_jsonable(self.boot_groups())
        d["check_counts"] = self.check_counts()
        return d


def group_boots(boots: list[BootRun]) -> list[BootGroup]:
    """One row per qemu x accelerator x guest: runs, how many booted, fastest/median/slowest
    time to the marker of the runs that booted."""
    groups: dict[tuple[str, str, str], list[BootRun]] = {}
    for b in boots:
        groups.setdefault((b.qemu, b.accel, b.guest), []).append(b)
    out = []
    for (q, a, g), runs in sorted(groups.items()):
        t = sorted(r.seconds for r in runs if r.booted and r.seconds is not None)
        out.append(BootGroup(q, a, g, len(runs), sum(r.booted for r in runs),
                             t[0] if t else None, statistics.median(t) if t else None,
                             t[-1] if t else None))
    return out


def _lock(s: Settings, rep: Report) -> None:
    p = runner.lock_path(s)
    if not p.is_file():
        return
    try:
        lock = LabLock.load(p)
    except KvmlabError as e:
        rep.problems.append(e.message)
        return
    rep.lock_path = str(p)
    rep.lock = {"host": lock.host, "recipe": lock.recipe, "builder": lock.builder,
                "source": lock.source, "patches": len(lock.patches),
                "installed": len(lock.installed), "firmware_dirs": lock.firmware_dirs,
                "boot": lock.boot, "nested": lock.nested, "host_facts": lock.host_facts,
                "written": p.stat().st_mtime}


def _run(s: Settings, rep: Report) -> None:
    doc = runlog.read(s)
    if doc is None:
        return
    t0 = float(doc.get("started") or 0)
    for st in doc["steps"]:
        if isinstance(st, dict):
            rep.steps.append(StepBar(str(st.get("step", "?")), str(st.get("status", "?")),
                                     max(0.0, float(st.get("started") or t0) - t0),
                                     float(st.get("seconds") or 0), str(st.get("figure", ""))))
    checks = doc.get("checks")
    if isinstance(checks, list):
        rep.checks = [CheckRow(str(c.get("host", "?")), str(c.get("step", "?")),
                               str(c.get("name", "?")), str(c.get("status", "?")),
                               str(c.get("message", ""))) for c in checks if isinstance(c, dict)]
    rep.run = {k: v for k, v in doc.items() if k not in ("steps", "checks")}
    rep.run["path"] = str(runlog.path(s))


def _phases(m: dict[str, Any]) -> dict[str, float]:
    raw: dict[str, Any] = dict(m.get("timings") or {}) if isinstance(m.get("timings"), dict) \
        else {}
    if isinstance(m.get("seconds"), dict):      # kmod builds: {"prepare", "make", "total"}
        raw.update({k: v for k, v in m["seconds"].items() if k != "total"})
    if "configure" in raw or "make" in raw:
        raw.pop("run", None)                    # split: configure and make are drawn instead
    return {k: float(raw[k]) for k in PHASES if isinstance(raw.get(k), (int, float))}


def _builds(s: Settings, rep: Report) -> None:
    for name, path, m in status.build_manifests(s):
        if not m:
            rep.problems.append(f"{path}: not a readable build manifest")
            continue
        secs = m.get("seconds")
        total = secs.get("total") if isinstance(secs, dict) else secs
        rep.builds.append(BuildPhases(
            name, str(path), str(m.get("built_at", "")),
            float(total) if isinstance(total, (int, float)) else None, _phases(m),
            str(m.get("compiler") or ""), str(m.get("image") or "")))


def _when(run_dir: Path, fallback: Path) -> float:
    try:   # run dirs are named YYYYmmdd-HHMMSS-<kind>-<nonce>
        return time.mktime(time.strptime(run_dir.name[:15], "%Y%m%d-%H%M%S"))
    except ValueError:
        try:
            return fallback.stat().st_mtime
        except OSError:
            return 0.0


def _boot_run(r: dict[str, Any], source: Path) -> BootRun:
    run_dir = Path(str(r.get("run_dir") or source.parent))
    secs = r.get("seconds")
    return BootRun(str(r.get("qemu_version") or r.get("qemu") or "?"),
                   str(r.get("accel") or "none"), str(r.get("guest") or "?"),
                   float(secs) if isinstance(secs, (int, float)) else None,
                   bool(r.get("booted")), _when(run_dir, source), str(r.get("failure") or ""),
                   str(source))


def _boots(s: Settings, rep: Report) -> None:
    seen: set[str] = set()
    found: list[BootRun] = []
    for f in sorted(vm.runs_dir(s).glob("*/result.json")):
        try:
            r = read_json(f, None)
        except (OSError, ValueError) as e:
            rep.problems.append(f"{f}: {e}")
            continue
        if isinstance(r, dict):
            seen.add(str(f.parent))
            found.append(_boot_run(r, f))
    try:   # the last boot-test, when its run directory was pruned since
        last = read_json(vm.last_path(s), None)
    except (OSError, ValueError) as e:
        rep.problems.append(f"{vm.last_path(s)}: {e}")
        last = None
    for r in last if isinstance(last, list) else []:
        if isinstance(r, dict) and str(r.get("run_dir")) not in seen:
            found.append(_boot_run(r, vm.last_path(s)))
    found += _nested_boots(s, rep)
    rep.boots = sorted(found, key=lambda b: b.when)


def _nested_boots(s: Settings, rep: Report) -> list[BootRun]:
    """The nested lab's boot (qemu-kvm under KVM inside the lab VM), as one more comparison."""
    out = []
    for f in sorted((s.state_dir / "nested").glob("*/record.json")):
        try:
            r = read_json(f, None)
        except (OSError, ValueError) as e:
            rep.problems.append(f"{f}: {e}")
            continue
        if not isinstance(r, dict) or not (r.get("accel") or r.get("failed")):
            continue
        secs = r.get("nested_seconds")
        out.append(BootRun(str(r.get("qemu_version") or "?"),
                           f"{r.get('accel') or 'none'} (nested)", "tiny",
                           float(secs) if isinstance(secs, (int, float)) else None,
                           not r.get("failed") and isinstance(secs, (int, float)),
                           f.stat().st_mtime, str(r.get("error") or ""), str(f)))
    return out


def _flatten(d: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = "-" if d is None else str(d)
    return out


def _doctor(s: Settings, rep: Report) -> None:
    found = status.doctor_record(s)
    if found is not None:
        path, rec = found
        rep.doctor_path = str(path)
        rep.doctor_facts = _flatten(rec["facts"])
        rep.doctor_checks = [c for c in rec.get("checks") or [] if isinstance(c, dict)]
    elif rep.lock and rep.lock.get("host_facts"):
        rep.doctor_path = rep.lock_path
        rep.doctor_facts = _flatten(rep.lock["host_facts"])


def gather(s: Settings) -> Report:
    """Everything the report shows; LabError when no lab ever ran with this state dir."""
    rep = Report(str(s.state_dir), time.time())
    _lock(s, rep)
    _run(s, rep)
    if rep.lock is None and rep.run is None:
        raise LabError(f"nothing to report: no lab run is recorded in {s.state_dir} "
                       f"(no {runner.lock_path(s).name}, no {runlog.path(s).name})",
                       hint="run `invoke lab` first (`invoke lab --report` writes the report "
                            "at its end), or set KVMLAB_STATE_DIR to the lab's state dir")
    _builds(s, rep)
    _boots(s, rep)
    _doctor(s, rep)
    return rep
