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
    if st.last_boot:
        for r in st.last_boot["runs"]:
            ui.info(f"last boot-test: {r['guest']} {'booted' if r['booted'] else 'FAILED'} "
                    f"under {r['accel'] or '?'} ({r.get('qemu_version') or r.get('qemu')}); "
                    f"{st.last_boot['path']}")
    else:
        ui.info("last boot-test: none")
    d = st.doctor
    ui.info(f"last doctor verdict: {d['verdict']} ({d['path']})" if d else
            "last doctor verdict: none recorded (`invoke lab` records it)")
    if st.next:
        ui.table("what `lab` would do next", ["step", "next", "detail"],
                 [(n.step, n.next, n.detail) for n in st.next], status_col=None)
    for p in st.problems:
        ui.warn(p)


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
