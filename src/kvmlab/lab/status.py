"""`status`: the resolved state of this bench, read from what the steps recorded; never writes.

Like ``vagrant status`` / ``mkosi summary``: every setting with where its value came from, the
recipes (valid or not), the lock entries, what is fetched (cache), built (out/*/*/manifest.json),
installed (<state>/installs/*.json), the last boot-test (<state>/vm/last-boot.json, written by
`boot-test` and the lab's step), the last doctor verdict (the newest of
<state>/host/last-doctor.json and the lab's doctor stamp) and, step by step, what `lab` would do
next.

A step's ``next`` is ``fresh`` when its recorded inputs are exactly today's (the stamped steps:
doctor, boot-test), ``recorded`` when it has a record and checks its inputs when it runs (no-op
while they are unchanged), ``runs`` when there is nothing recorded or it always runs, and
``skipped`` when it does not apply.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmlab import install
from kvmlab.boot import vm
from kvmlab.core.errors import KvmlabError
from kvmlab.core.fsutil import read_json
from kvmlab.core.records import to_jsonable, utc_stamp
from kvmlab.core.settings import SETTINGS, Settings, env_name
from kvmlab.host import verdict
from kvmlab.lab import runner, steps
from kvmlab.model.recipe import Recipe, list_recipes, load_recipe
from kvmlab.source import fetch, prepare
from kvmlab.source.lock import read_lock


@dataclass(frozen=True)
class SettingRow:
    name: str
    value: str
    source: str        # flag / env / config / default
    env: str           # the KVMLAB_* variable that sets it


@dataclass(frozen=True)
class RecipeRow:
    name: str
    path: str
    valid: bool
    detail: str        # source file and builders, or what is wrong


@dataclass(frozen=True)
class Entry:
    """One recorded thing: a lock entry, a cached source, a build, an install manifest."""
    name: str
    path: str
    detail: str = ""


@dataclass(frozen=True)
class NextStep:
    step: str
    next: str          # fresh / recorded / runs / skipped
    detail: str


@dataclass
class Status:
    settings: list[SettingRow]
    recipes: list[RecipeRow]
    lock: list[Entry]
    fetched: list[Entry]
    built: list[Entry]
    installed: list[Entry]
    last_boot: dict[str, Any] | None
    doctor: dict[str, Any] | None
    next: list[NextStep] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)   # what could not be read, and why

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)

    @property
    def invalid_recipes(self) -> list[RecipeRow]:
        return [r for r in self.recipes if not r.valid]


def _settings_rows(s: Settings, sources: dict[str, str]) -> list[SettingRow]:
    return [SettingRow(x.name, str(getattr(s, x.name)), sources.get(x.name, "default"),
                       env_name(x.name)) for x in SETTINGS]


def _recipe_rows(s: Settings) -> list[RecipeRow]:
    rows = []
    for r in list_recipes(s.recipes_dir):
        if isinstance(r, KvmlabError):
            rows.append(RecipeRow("?", "", False, r.message))
        else:
            pin = "pinned" if r.source.pinned else "locked on first fetch"
            rows.append(RecipeRow(r.name, str(r.path), True,
                                  f"{r.source.file} ({pin}); builders: "
                                  f"{', '.join(r.builders) or '-'}"))
    return rows


def _lock_entries(s: Settings, problems: list[str]) -> list[Entry]:
    try:
        data = read_lock(s.lock)
    except KvmlabError as e:
        problems.append(e.message)
        return []
    return [Entry(key, str(s.lock), str((v or {}).get("sha256", "")))
            for key, v in sorted(data.get("sources", {}).items())]


def _fetched(s: Settings) -> list[Entry]:
    base = s.sources_cache
    if not base.is_dir():
        return []
    out = []
    for f in sorted(base.glob("*/*")):
        if f.is_file() and not f.name.startswith(".") and not f.parent.name.startswith("."):
            out.append(Entry(f.name, str(f), f"sha256 {f.parent.name}, {f.stat().st_size} bytes"))
    return out


def build_manifests(s: Settings) -> list[tuple[str, Path, dict[str, Any]]]:
    """Every out/<recipe>/<builder>/manifest.json as (recipe/builder, path, its JSON object;
    {} when unreadable)."""
    out = []
    for mf in sorted(s.out_dir.glob("*/*/manifest.json")):
        try:
            m = read_json(mf, {}) or {}
        except (OSError, ValueError):
            m = {}
        out.append((f"{mf.parent.parent.name}/{mf.parent.name}", mf,
                    m if isinstance(m, dict) else {}))
    return out


def _built(s: Settings) -> list[Entry]:
    return [Entry(name, str(mf), f"{len(m.get('artifacts') or [])} artifact(s)")
            for name, mf, m in build_manifests(s)]


def _installed(s: Settings) -> list[Entry]:
    out = []
    for path, m in install.list_manifests(s):
        recipes = sorted({str(i.get("recipe")) for i in m.installs if i.get("recipe")})
        out.append(Entry(m.root or str(path), str(path),
                         f"{len(m.files)} file(s); {', '.join(recipes) or '-'}"
                         + ("; firmware" if m.bios else "")))
    return out


def _last_boot(s: Settings, problems: list[str]) -> dict[str, Any] | None:
    p = vm.last_path(s)
    try:
        runs = read_json(p, None)
    except (OSError, ValueError) as e:
        problems.append(f"{p}: {e}")
        return None
    if not isinstance(runs, list) or not runs:
        return None
    try:
        when: str | None = utc_stamp(p.stat().st_mtime)
    except OSError:
        when = None
    keys = ("guest", "booted", "accel", "seconds", "qemu", "qemu_version", "failure")
    return {"path": str(p), "time": when,
            "runs": [{k: r.get(k) for k in keys} for r in runs if isinstance(r, dict)]}


def doctor_record(s: Settings) -> tuple[Path, dict[str, Any]] | None:
    """The lab's last doctor record ({"facts": ..., "checks": [...]}; older labs recorded the
    facts only) and the stamp it is kept in; None when no lab recorded one."""
    st = runner.stamp(s, "doctor")
    data = st.read()
    rec = ((data or {}).get("record") or {}).get("record")
    if not isinstance(rec, dict) or not isinstance(rec.get("facts"), dict):
        return None
    return st.path, rec


def _doctor(s: Settings) -> dict[str, Any] | None:
    """The newest verdict: <state>/host/last-doctor.json (every doctor run, standalone or the
    lab's) or the lab's doctor stamp (its file time), whichever is later."""
    stamped = None
    found_lab = doctor_record(s)
    if found_lab is not None:
        path, rec = found_lab
        facts = rec["facts"]
        try:
            when = utc_stamp(path.stat().st_mtime)
        except OSError:
            when = None
        stamped = {"path": str(path), "time": when, "source": "lab",
                   "verdict": facts.get("verdict"), "usable": facts.get("usable"), "facts": facts}
    found = verdict.newest(verdict.read_record(s.state_dir), stamped)
    if found is None:
        return None
    return {k: found.get(k) for k in ("path", "time", "source", "verdict", "usable", "facts")}


def _next_steps(s: Settings, recipe: Recipe) -> list[NextStep]:
    c = steps.Ctx(s, steps.LabOptions(recipe=recipe.name, builder=s.builder))
    done = (read_json(runner.state_path(s), {}) or {}).get("done", {})
    c.records.update({k: (v or {}).get("record", {}) for k, v in done.items()})
    out = []
    for step in steps.STEPS:
        out.append(_next_of(s, recipe, c, step))
    return out


def _next_of(s: Settings, recipe: Recipe, c: steps.Ctx, step: steps.Step) -> NextStep:
    n = step.name
    if step.inputs is not None:
        inputs = step.inputs(c)
        st = runner.stamp(s, n)
        if inputs is not None and st.fresh(inputs) is not None:
            return NextStep(n, "fresh", f"inputs unchanged since {st.path}")
        return NextStep(n, "runs", "no record" if st.read() is None else "inputs changed")
    if n == "fetch":
        rec = fetch.read_fetch_stamp(s, recipe)
        if rec and Path(str(rec.get("path", ""))).exists():
            return NextStep(n, "recorded", f"{rec.get('file')} in {rec.get('path')}")
        cached = sorted(s.sources_cache.glob(f"*/{recipe.source.file}"))
        return NextStep(n, "runs", f"{cached[0]} is in the cache: checked, not downloaded"
                        if cached else "not fetched yet: downloads")
    if n == "patch":
        p = prepare.patch_stamp_path(s, recipe)
        return NextStep(n, "recorded", str(p)) if p.is_file() else \
            NextStep(n, "runs", "not unpacked/patched yet")
    if n == "images":
        if s.builder == "native":
            return NextStep(n, "skipped", "native builder: no image")
        return NextStep(n, "runs", "checks the builder image (a no-op when its tag exists)")
    if n == "build":
        mf = s.out(recipe.name, s.builder) / "manifest.json"
        return NextStep(n, "recorded", str(mf)) if mf.is_file() else \
            NextStep(n, "runs", f"nothing built for {s.builder} yet")
    if n in ("install", "install-bios"):
        ok = [p for p, m in install.list_manifests(s)
              if any(i.get("recipe") == recipe.name for i in m.installs)
              and (n == "install" or m.bios)]
        return NextStep(n, "recorded", str(ok[0])) if ok else NextStep(n, "runs", "not installed")
    if n == "create-image":
        return NextStep(n, "recorded", str(c.disk)) if c.disk.exists() else \
            NextStep(n, "runs", f"creates {c.disk}")
    return NextStep(n, "runs", "always runs (idempotent)")


def status(s: Settings, sources: dict[str, str]) -> Status:
    """What this bench is and has, from the records alone (nothing is run or written)."""
    problems: list[str] = []
    st = Status(_settings_rows(s, sources), _recipe_rows(s), _lock_entries(s, problems),
                _fetched(s), _built(s), _installed(s), _last_boot(s, problems), _doctor(s),
                problems=problems)
    try:
        recipe = load_recipe(s.recipes_dir, s.recipe)
    except KvmlabError as e:
        problems.append(f"next steps unknown: {e.message}")
        return st
    st.next = _next_steps(s, recipe)
    return st
