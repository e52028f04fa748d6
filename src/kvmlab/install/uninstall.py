"""uninstall: remove exactly what install / install-bios wrote under DESTDIR+PREFIX (its install
manifest, walked backwards) and put back the files they replaced.

Reads every install manifest kvmlab ever wrote (kvmlab.model.manifests.InstallManifest).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmlab.core.errors import InstallError
from kvmlab.core.settings import Settings
from kvmlab.install.preflight import why_unwritable
from kvmlab.install.txn import (
    describe_existing,
    load_manifest,
    manifest_path_for,
    recipe_of,
    save_manifest,
    still_ours,
    target,
    unlink_quiet,
)
from kvmlab.model.manifests import InstallManifest
from kvmlab.model.recipe import Recipe


@dataclass
class UninstallResult:
    manifest_path: Path
    removed: list[str]
    restored: list[str]
    skipped: list[tuple[str, str]]
    dirs_removed: list[str]
    kept_backups: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)   # adopted: identical and there before kvmlab


def _find_manifest(settings: Settings, prefix: str | None, destdir: str | None,
                   recipe: Recipe | str | None, manifest: Path | None
                   ) -> tuple[Path, InstallManifest]:
    if manifest is not None:
        mpath = manifest
        where = str(manifest)
    else:
        rec = recipe_of(settings, recipe) if prefix is None else None
        t = target(prefix, destdir, rec)
        mpath = manifest_path_for(settings, t)
        where = str(t.root)
    m = load_manifest(mpath)
    if m is None:
        trees = sorted(p.name for p in (settings.state_dir / "installs").glob("*.json"))
        raise InstallError(f"nothing installed by kvmlab under {where} (no {mpath})",
                           hint="pass the same --prefix/--destdir as for install; installed "
                                "trees: " + (", ".join(trees) or "none"))
    return mpath, m


def _check_writable(entries: list[dict[str, Any]]) -> None:
    """Every directory uninstall touches must be writable -- before anything is removed."""
    dirs = {Path(e["path"]).parent for e in entries}
    bad = [d for d in dirs if d.is_dir() and not os.access(d, os.W_OK | os.X_OK)]
    if bad:
        hint = "run it with sudo" if os.geteuid() != 0 else "make it writable"
        raise InstallError(f"cannot write to {bad[0]}: {why_unwritable(bad[0])}; nothing was "
                           "uninstalled", hint=hint)


def _undo(e: dict[str, Any], res: UninstallResult, force: bool) -> bool:
    """Remove (or restore the backup of) one entry; False when it stays in the manifest."""
    p = Path(e["path"])
    if e.get("adopted"):     # it was there before kvmlab, identical: it stays
        res.kept.append(str(p))
        return True
    cur = describe_existing(p)
    if cur is not None and not still_ours(e, cur) and not force:
        res.skipped.append((str(p), "changed since kvmlab installed it (use --force)"))
        return False
    rep = e.get("replaced")
    try:
        if rep and rep.get("backup") and os.path.lexists(rep["backup"]):
            os.replace(rep["backup"], p)
            res.restored.append(str(p))
        else:
            if rep and rep.get("backup"):
                res.skipped.append((str(p), f"backup {rep['backup']} is gone; file removed"))
            if cur is not None:
                os.unlink(p)
            res.removed.append(str(p))
        for ob in e.get("older_backups") or []:
            if ob and ob.get("backup") and os.path.lexists(ob["backup"]):
                res.kept_backups.append(ob["backup"])   # an even older original: the user decides
    except OSError as ex:
        res.skipped.append((str(p), ex.strerror or str(ex)))
        return False
    return True


def _remove_dirs(m: InstallManifest, entries: list[dict[str, Any]], step: str | None,
                 res: UninstallResult) -> list[str]:
    """rmdir the directories install created (deepest first); the ones that stay."""
    remaining = []
    for d in sorted(m.dirs_created, key=lambda s: -len(Path(s).parts)):
        if step is not None and any(Path(k["path"]).is_relative_to(d) for k in m.files
                                    if k not in entries):
            remaining.append(d)
            continue
        try:
            os.rmdir(d)
            res.dirs_removed.append(d)
        except FileNotFoundError:
            pass
        except OSError:
            remaining.append(d)   # not empty: someone else put files there
    return remaining


def uninstall(settings: Settings, *, prefix: str | None = None, destdir: str | None = None,
              recipe: Recipe | str | None = None, step: str | None = None, force: bool = False,
              manifest: Path | None = None) -> UninstallResult:
    """Remove exactly what install/install-bios wrote under DESTDIR+PREFIX; restore backups.

    A file changed since kvmlab wrote it is left alone (reported) unless force.
    step: only undo "install" or "install-bios" entries.
    """
    mpath, m = _find_manifest(settings, prefix, destdir, recipe, manifest)
    entries = [e for e in m.files if step is None or e.get("step") == step]
    _check_writable(entries)
    res = UninstallResult(mpath, [], [], [], [])
    keep = [e for e in reversed(entries) if not _undo(e, res, force)]
    remaining_dirs = _remove_dirs(m, entries, step, res)
    m.files = [e for e in m.files if e not in entries] + list(reversed(keep))
    m.dirs_created = [d for d in m.dirs_created if d in remaining_dirs]
    if step in (None, "install-bios") and not any(e.get("step") == "install-bios"
                                                  for e in m.files):
        m.bios = None
    if m.files:
        save_manifest(mpath, m)
    else:
        unlink_quiet(mpath)
    return res
