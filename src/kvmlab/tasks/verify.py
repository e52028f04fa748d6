"""verify and recipes tasks."""
from __future__ import annotations

from invoke import Context

from kvmlab.core import ui
from kvmlab.core.errors import VerifyError
from kvmlab.lab import verify as verify_mod
from kvmlab.model.recipe import list_recipes

from ._common import settings, task


@task(help={"step": "comma-separated steps (fetch, patch, build, doctor, boot-test, ...; or a "
                    "check file's name: host, boot, kmod) or 'all'",
            "hosts": "comma-separated testinfra hosts: local://, docker://NAME, ssh://user@host",
            "recipe": "recipe whose state is checked",
            "builder": "builder whose outputs are checked"})
def verify(ctx: Context, step: str = "all", hosts: str = "local://", recipe: str = "",
           builder: str = "") -> None:
    """Run the testinfra checks of one step (or all) against hosts; print a pass/fail table."""
    s = settings(ctx, recipe=recipe, builder=builder)
    steps = verify_mod.available_steps(s) if step == "all" else [x for x in step.split(",") if x]
    report = verify_mod.run_checks(s, steps, [h for h in hosts.split(",") if h])
    verify_mod.print_report(report)
    if not report.ok:
        bad = report.failed()
        raise VerifyError(f"{len(bad)} check(s) failed: " +
                          ", ".join(f"{r.step}/{r.name}@{r.host}" for r in bad[:5]),
                          hint="see the table above; re-run the failing step")


@task
def recipes(ctx: Context) -> None:
    """List the recipes and whether they are valid."""
    s = settings(ctx)
    rows = []
    for r in list_recipes(s.recipes_dir):
        if isinstance(r, Exception):
            rows.append(("?", "", "", "error", r.message))
        else:
            pin = "pinned" if r.source.pinned else "locked on first fetch"
            rows.append((r.name, r.kind, r.version, "ok",
                         f"{r.source.file} ({pin}); builders: {', '.join(r.builders) or '-'}"))
    ui.table("recipes", ["name", "kind", "version", "status", "detail"], rows)
