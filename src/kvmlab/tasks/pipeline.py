"""fetch and patch tasks (kvmlab.source.fetch, kvmlab.source.prepare)."""
from __future__ import annotations

from invoke import Context

from kvmlab.core import ui
from kvmlab.model.recipe import load_recipe
from kvmlab.source.fetch import FetchOptions, FetchResult, fetch_source
from kvmlab.source.prepare import PreparedSource, prepare

from ._common import run_step_checks, settings, task

_HELP = {
    "recipe": "recipe name (recipes/NAME.toml) or path to a .toml file",
    "source": "use this local tarball or source directory instead of downloading",
    "offline": "use the download cache only, never the network",
    "timeout": "stall timeout: seconds without data before a mirror is left for the next one "
               "(default 30, or KVMLAB_FETCH_TIMEOUT)",
    "no-verify": "skip the testinfra checks run at the end",
}


def _show_fetch(r: FetchResult) -> None:
    how = {"downloaded": f"downloaded from {r.origin}",
           "cached": f"{ui.styled('cached')}: already in the cache, not downloaded",
           "local": f"taken from {r.origin}"}[r.status]
    ui.info(f"[bold]{r.file}[/bold]: {how}")
    ui.info(f"  sha256  {r.sha256} ({r.check})")
    if r.kind == "dir":
        ui.info(f"  source  {r.path} (directory, used as is)")
    else:
        ui.info(f"  cache   {r.path} ({r.size / 1e6:.1f} MB)")
    if r.check == "relocked":
        if r.previous == r.sha256:
            ui.info("  lock    unchanged: the entry already had this sha256")
        else:
            ui.info(f"  lock    entry {r.recipe}/{r.file} replaced (--relock)\n"
                    f"          old {r.previous or '(none)'}\n          new {r.sha256}")


@task(help={**_HELP, "force": "download again even when the cache has a verified copy",
            "relock": "fetch again and replace the recipe's kvmlab.lock entry with the sha256 of "
                      "what arrived, showing old and new (never overrides a pinned sha256)"})
def fetch(ctx: Context, recipe: str = "", source: str = "", offline: bool = False,
          force: bool = False, relock: bool = False, timeout: float = 0.0,
          no_verify: bool = False, json_: bool = False) -> None:
    """Download a recipe's source (mirrors, retries, resume) into the verified cache."""
    s = settings(ctx, recipe=recipe)
    r = load_recipe(s.recipes_dir, s.recipe)
    res = fetch_source(s, r, source=source or None, offline=offline, force=force, relock=relock,
                       options=FetchOptions.from_env(timeout or None))
    if not json_:
        _show_fetch(res)
    checked = run_step_checks(s, "fetch", no_verify)
    if json_:
        ui.emit_json({**res.to_dict(), "verify": checked})


@task(help={**_HELP, "builder": "builder whose patch series is applied (debian12, centos6, "
                                "native)",
            "force": "unpack and patch again even when nothing changed",
            "dry-run": "check that the whole series applies, without touching the tree"})
def patch(ctx: Context, recipe: str = "", builder: str = "", source: str = "",
          offline: bool = False, force: bool = False, dry_run: bool = False,
          timeout: float = 0.0, no_verify: bool = False, json_: bool = False) -> None:
    """Fetch, unpack and apply the builder's patch series (all or nothing, no fuzz)."""
    s = settings(ctx, recipe=recipe, builder=builder)
    r = load_recipe(s.recipes_dir, s.recipe)
    p = prepare(s, r, s.builder, source=source or None, offline=offline, force=force,
                dry_run=dry_run, options=FetchOptions.from_env(timeout or None))
    if p.fetched:
        _show_fetch(p.fetched)
    series = r.series_path(s.patches_dir, s.builder)
    ui.info(f"[bold]{r.name}[/bold] for {s.builder}: series {series or '(none)'}")
    mark, verb = ("ok", "applies") if dry_run else \
        ("no-op", "already applied") if p.noop else ("ok", "applied")
    for rec in p.patches:
        ui.info(f"  {ui.styled(mark)} {rec['name']} ({verb}) sha256 {rec['sha256'][:16]}")
    for name in p.skipped:
        ui.info(f"  {ui.styled('skipped')} {name} (its if= option is off)")
    if dry_run:
        ui.info(f"dry run: all {len(p.patches)} patch(es) apply; {p.src_dir} was not touched")
        if json_:
            ui.emit_json(_patch_doc(p, series, dry_run))
        return
    state = "no-op: the series is already applied" if p.noop else \
        f"{'unpacked, ' if p.unpacked else ''}applied {len(p.patches)} patch(es)"
    ui.info(f"tree    {p.src_dir} ({state})")
    checked = run_step_checks(s, "patch", no_verify)
    if json_:
        ui.emit_json({**_patch_doc(p, series, dry_run), "verify": checked})


def _patch_doc(p: PreparedSource, series: object, dry_run: bool) -> dict:
    return {"src_dir": str(p.src_dir), "series": str(series) if series else None,
            "dry_run": dry_run, "noop": p.noop, "unpacked": p.unpacked, "patches": p.patches,
            "skipped": list(p.skipped),
            "fetched": p.fetched.to_dict() if p.fetched else None}
