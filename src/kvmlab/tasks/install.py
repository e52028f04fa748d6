"""install, install-bios and uninstall tasks."""
from __future__ import annotations

from invoke import Context

from kvmlab import install as inst
from kvmlab.core import ui
from kvmlab.core.errors import InstallError
from kvmlab.model.recipe import load_recipe

from ._common import dry_run_end, run_step_checks, settings, task


def _short(sha: str) -> str:
    return sha[:16] if sha else ""


def _rows(rows, out_dir=None):  # noqa: ANN001, ANN202
    """Table rows; sources inside the build output are shown as <out>/... (printed once)."""
    base = str(out_dir).rstrip("/") + "/" if out_dir else None
    return [(r.name or "", "<out>/" + r.source[len(base):] if base and r.source.startswith(base)
             else r.source, r.path, _short(r.sha256), r.status) for r in rows]


def _out_line(s, rows) -> object:  # noqa: ANN001
    out = s.out(s.recipe, s.builder)
    if any(r.source.startswith(str(out) + "/") for r in rows):
        ui.info(f"<out> = {out}")
        return out
    return None


@task(help={"recipe": "recipe name or path (default from settings)",
            "builder": "builder whose out/ is installed (debian12, centos6, native)",
            "prefix": "install prefix (default: the recipe's, /usr/local)",
            "destdir": "staging root prepended to every path (like make's DESTDIR)",
            "mode": "copy (default), symlink (to the build output) or make-install (the tree's "
                    "own `make install` in the builder, then copied)",
            "dry-run": "show what would be written, write nothing",
            "install-deps": "apt-get install the packages that provide shared libraries the "
                            "build needs and this host lacks (needs root); without it install "
                            "refuses and prints the apt-get line",
            "no-verify": "skip the testinfra checks after installing"})
def install(ctx: Context, recipe: str = "", builder: str = "", prefix: str = "",
            destdir: str = "", mode: str = "copy", dry_run: bool = False,
            install_deps: bool = False, no_verify: bool = False, json_: bool = False) -> None:
    """Install the built binaries into PREFIX/bin (atomic, backups, install manifest).

    Before copying anything, the shared libraries the build recorded are looked up on this host
    (ld.so.cache and the loader's directories)."""
    s = settings(ctx, recipe=recipe, builder=builder)
    res = inst.install(s, s.recipe, s.builder, prefix=prefix or None, destdir=destdir or None,
                       mode=mode, dry_run=dry_run, install_deps=install_deps)
    if res.deps_installed:
        ui.info("installed runtime packages (apt-get): " + " ".join(res.deps_installed))
    out = _out_line(s, res.rows)
    ui.table(f"install ({res.mode}) into {res.root}",
             ["file", "source", "destination", "sha256", "status"], _rows(res.rows, out))
    for w in res.warnings:
        ui.warn(w)
    if dry_run:
        dry_run_end()
        if json_:
            ui.emit_json({**res.to_dict(), "dry_run": True})
        return
    ui.info(("nothing to do: " if res.noop else "") + f"install manifest: {res.manifest_path}")
    ui.info(f"next: `invoke install-bios --prefix {res.prefix}"
            + (f" --destdir {res.destdir}" if res.destdir else "") + "` puts the firmware "
            "where this binary looks")
    checked = run_step_checks(s, "install", no_verify, extra_env={
        "KVMLAB_VERIFY_INSTALL_MANIFEST": str(res.manifest_path)})
    if json_:
        ui.emit_json({**res.to_dict(), "dry_run": False, "verify": checked})


@task(name="install-bios",
      help={"recipe": "recipe name or path (default from settings)",
            "builder": "builder whose out/pc-bios is installed",
            "prefix": "prefix the binary was installed to (default: the recipe's)",
            "destdir": "staging root used for install",
            "qemu": "this qemu binary instead of the installed one (e.g. a distribution qemu)",
            "firmware-from": "comma-separated directories to take firmware from that the binary "
                             "asks for but the build lacks (e.g. /usr/share/seabios)",
            "timeout": "seconds each trial start of the binary may take",
            "dry-run": "show the search path and what would be written, write nothing",
            "no-verify": "skip the testinfra checks (the proof start always runs)"})
def install_bios(ctx: Context, recipe: str = "", builder: str = "", prefix: str = "",
                 destdir: str = "", qemu: str = "", firmware_from: str = "",
                 timeout: int = 20, dry_run: bool = False, no_verify: bool = False,
                 json_: bool = False) -> None:
    """Put bios.bin, vapic.bin and option ROMs where the installed qemu looks; prove it starts.

    The directories come from the build's recorded configuration and a paused trial start of the
    binary (under strace where available)."""
    s = settings(ctx, recipe=recipe, builder=builder)
    res = inst.install_bios(s, s.recipe, s.builder, prefix=prefix or None,
                            destdir=destdir or None, qemu=qemu or None,
                            firmware_from=[d for d in firmware_from.split(",") if d],
                            prove=not dry_run, dry_run=dry_run,
                            timeout=timeout)
    sr = res.search
    ui.info(f"binary: {res.qemu} ({sr.version})")
    ui.table(f"where it looks for firmware ({sr.method})", ["source", "directory", "note"],
             sr.explain, status_col=None)
    out = _out_line(s, res.rows)
    ui.table("firmware", ["file", "source", "destination", "sha256", "status"],
             _rows(res.rows, out))
    for w in res.warnings:
        ui.warn(w)
    if dry_run:
        dry_run_end()
        if json_:
            ui.emit_json({**res.to_dict(), "dry_run": True})
        return
    if res.noop:
        ui.info("nothing to do: every file was already correct")
    if res.manifest_path:
        ui.info(f"install manifest: {res.manifest_path}")
    p = res.proof
    assert p is not None
    _show_debug_lines(s, p)
    if not p.ok:
        raise InstallError(f"{res.qemu} still does not get past firmware loading: "
                           f"{inst.explain_failure(p)}",
                           hint="see the search-path table above; `--firmware-from DIR` supplies "
                                "files the build lacks").with_report(res.to_dict())
    bios = next((v for k, v in p.loaded.items() if inst.BIOS_RE.match(k)), None)
    ui.info(f"[green]proof:[/green] {res.qemu.name} started paused (-S, headless), its monitor "
            f"answered ({p.monitor_banner!r})"
            + (f", BIOS loaded from {bios}" if bios else "") + "; quit it")
    for n in p.missing_warn:
        ui.warn(f"it still warns about {n} (no source for it)")
    checked = run_step_checks(s, "install-bios", no_verify,
                              extra_env={"KVMLAB_VERIFY_INSTALL_MANIFEST": str(res.manifest_path)}
                              if res.manifest_path and res.manifest_path.exists() else None)
    if json_:
        ui.emit_json({**res.to_dict(), "dry_run": False, "verify": checked})


def _show_debug_lines(s, proof) -> None:  # noqa: ANN001
    """With the recipe option debug-bios-path, the binary prints each firmware path it loads."""
    try:
        r = load_recipe(s.recipes_dir, s.recipe)
    except Exception:  # the recipe was loaded fine a moment ago; never fail on display
        return
    if not r.option("debug-bios-path"):
        return
    lines = [ln for ln in proof.stderr.splitlines()
             if ln.startswith(("qemu: firmware ", "qemu: loading ", "qemu: PC BIOS "))]
    if lines:
        ui.info("the binary reports (debug-bios-path):")
        for ln in lines:
            ui.info("  " + ln)


@task(help={"recipe": "recipe whose default prefix is used when --prefix is not given",
            "prefix": "prefix given to install / install-bios",
            "destdir": "staging root given to install / install-bios",
            "step": "only undo install or install-bios (default: both)",
            "force": "also remove files that changed since kvmlab installed them"})
def uninstall(ctx: Context, recipe: str = "", prefix: str = "", destdir: str = "",
              step: str = "", force: bool = False, json_: bool = False) -> None:
    """Remove exactly what install/install-bios wrote and restore the files they replaced."""
    if step not in ("", "install", "install-bios"):
        raise InstallError(f"unknown --step {step!r}", hint="install or install-bios")
    s = settings(ctx, recipe=recipe)
    res = inst.uninstall(s, prefix=prefix or None, destdir=destdir or None, recipe=s.recipe,
                         step=step or None, force=force)
    rows = [(p, "removed") for p in res.removed] + [(p, "restored from backup")
                                                     for p in res.restored]
    rows += [(p, f"skipped: {why}") for p, why in res.skipped]
    rows += [(p, "kept (it was there, identical, before kvmlab)") for p in res.kept]
    rows += [(d, "removed (directory)") for d in res.dirs_removed]
    ui.table("uninstall", ["path", "status"], rows)
    for b in res.kept_backups:
        ui.warn(f"kept {b}: the original from before an earlier install (that file was changed "
                "by hand in between; the hand-changed version was restored)")
    if res.skipped:
        ui.warn(f"{len(res.skipped)} file(s) left in place; the manifest still lists them: "
                f"{res.manifest_path}")
    if json_:
        ui.emit_json({"manifest": str(res.manifest_path), "removed": res.removed,
                      "restored": res.restored, "dirs_removed": res.dirs_removed,
                      "kept": res.kept, "kept_backups": res.kept_backups,
                      "skipped": [{"path": p, "reason": why} for p, why in res.skipped]})
