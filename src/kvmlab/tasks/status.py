"""status task: the resolved state of this bench (kvmlab.lab.status)."""
from __future__ import annotations

from invoke import Context

from kvmlab.core import ui
from kvmlab.core.errors import RecipeError
from kvmlab.lab import status as status_mod

from ._common import settings_with_sources, task


def _show(st: status_mod.Status) -> None:
    ui.table("settings", ["setting", "value", "source"],
             [(r.name, r.value, r.source) for r in st.settings], status_col=None)
    ui.table("recipes", ["name", "status", "detail"],
             [(r.name, "ok" if r.valid else "error", r.detail) for r in st.recipes])
    for title, rows in (("lock (kvmlab.lock)", st.lock), ("fetched (cache)", st.fetched),
                        ("built (out/)", st.built), ("installed (install manifests)",
                                                      st.installed)):
        if rows:
            ui.table(title, ["name", "path", "detail"],
                     [(e.name, e.path, e.detail) for e in rows], status_col=None)
        else:
            ui.info(f"{title}: none")
    for line in _last_lines(st):
        ui.info(line)
    if st.next:
        ui.table("what `lab` would do next", ["step", "next", "detail"],
                 [(n.step, n.next, n.detail) for n in st.next], status_col=None)
    for p in st.problems:
        ui.warn(p)


def _last_lines(st: status_mod.Status) -> list[str]:
    """The last boot-test (qemu, accel, guest, time to marker) and the last doctor verdict."""
    lines = []
    b = st.last_boot or {}
    for r in b.get("runs", []):
        secs = r.get("seconds")
        took = f" in {secs:.2f} s" if isinstance(secs, (int, float)) else ""
        what = "booted" + took if r.get("booted") else f"FAILED ({r.get('failure') or '?'})"
        lines.append(f"last boot-test: {r.get('guest')} {what} under {r.get('accel') or '?'} "
                     f"({r.get('qemu_version') or r.get('qemu')}); {b.get('time') or '?'}, "
                     f"{b['path']}")
    if not lines:
        lines.append("last boot-test: none")
    d = st.doctor
    if d:
        by = {"doctor": "invoke doctor", "lab": "invoke lab"}.get(str(d.get("source")),
                                                                 str(d.get("source")))
        usable = "KVM usable" if d.get("usable") else "KVM not usable"
        lines.append(f"last doctor verdict: {d['verdict']} ({usable}; {by}, "
                     f"{d.get('time') or '?'}, {d['path']})")
    else:
        lines.append("last doctor verdict: none recorded (`invoke doctor` or `invoke lab` "
                     "records it)")
    return lines


@task(help={"recipe": "recipe whose next lab steps are shown (default from settings)",
            "builder": "builder whose outputs are shown"})
def status(ctx: Context, recipe: str = "", builder: str = "", json_: bool = False) -> None:
    """Show settings (and where each came from), recipes, lock, cache, builds, installs, the
    last boot-test and doctor verdict, and what `lab` would do next. Writes nothing."""
    s, sources = settings_with_sources(ctx, recipe=recipe, builder=builder)
    st = status_mod.status(s, sources)
    if not json_:
        _show(st)
    bad = st.invalid_recipes
    if bad:
        raise RecipeError(f"{len(bad)} invalid recipe(s): {bad[0].detail}",
                          hint="fix the recipe file named above (`invoke recipes` lists them)"
                          ).with_report(st.to_dict())
    if json_:
        ui.emit_json(st.to_dict())
