"""verify and recipes tasks."""
from __future__ import annotations

from typing import Any

from invoke import Context

from kvmlab.core import ui
from kvmlab.core.errors import KvmlabError, RecipeError, VerifyError
from kvmlab.lab import verify as verify_mod
from kvmlab.model.recipe import list_recipes

from ._common import settings, task


@task(help={"step": "comma-separated steps (fetch, patch, build, doctor, boot-test, ...; or a "
                    "check file's name: host, boot, kmod) or 'all'",
            "hosts": "the hosts to check",
            "accept_new_host_keys": "record the keys of ssh hosts not yet in a known_hosts "
                                    "file (ssh's accept-new) instead of refusing them; a "
                                    "changed key is always refused",
            "recipe": "recipe whose state is checked",
            "builder": "builder whose outputs are checked"})
def verify(ctx: Context, step: str = "all", hosts: str = "local://", recipe: str = "",
           builder: str = "", accept_new_host_keys: bool = False,
           json_: bool = False) -> None:
    """Run the testinfra checks of one step (or all) against hosts; print a pass/fail table."""
    s = settings(ctx, recipe=recipe, builder=builder)
    steps = verify_mod.available_steps(s) if step == "all" else [x for x in step.split(",") if x]
    report = verify_mod.run_checks(s, steps, [h for h in hosts.split(",") if h],
                                   accept_new=accept_new_host_keys)
    counts = report.counts()
    doc = {"ok": report.ok, **report.to_dict(), **counts}
    if not json_:
        verify_mod.print_report(report)
        ui.info(f"checks: {counts['summary']}")
    if not report.ok:
        bad = report.failed()
        raise VerifyError(f"{len(bad)} check(s) failed: " +
                          ", ".join(f"{r.step}/{r.name}@{r.host}" for r in bad[:5]),
                          hint="see the table above; re-run the failing step"
                          ).with_report(doc)
    if json_:
        ui.emit_json(doc)


@task
def recipes(ctx: Context, json_: bool = False) -> None:
    """List the recipes and whether they are valid (exit 1 when any is not)."""
    s = settings(ctx)
    rows: list[tuple[str, ...]] = []
    docs: list[dict[str, Any]] = []
    bad: list[KvmlabError] = []
    for r in list_recipes(s.recipes_dir):
        if isinstance(r, KvmlabError):
            rows.append(("?", "", "", "error", r.message))
            docs.append({"name": None, "valid": False, "error": r.message, "hint": r.hint})
            bad.append(r)
        else:
            pin = "pinned" if r.source.pinned else "locked on first fetch"
            rows.append((r.name, r.kind, r.version, "ok",
                         f"{r.source.file} ({pin}); builders: {', '.join(r.builders) or '-'}"))
            docs.append({"name": r.name, "valid": True, "kind": r.kind, "version": r.version,
                         "path": str(r.path), "file": r.source.file, "pinned": r.source.pinned,
                         "builders": list(r.builders)})
    if not json_:
        ui.table("recipes", ["name", "kind", "version", "status", "detail"], rows)
    doc = {"recipes_dir": str(s.recipes_dir), "recipes": docs}
    if bad:
        raise RecipeError(f"{len(bad)} of {len(rows)} recipe(s) invalid: {bad[0].message}",
                          hint=bad[0].hint or "fix the file named above").with_report(doc)
    if not rows:
        raise RecipeError(f"no recipes in {s.recipes_dir}",
                          hint="set KVMLAB_RECIPES_DIR to a directory of *.toml recipes"
                          ).with_report(doc)
    if json_:
        ui.emit_json(doc)
