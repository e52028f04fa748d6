"""prepare: fetch + unpack + patch, the source tree every later step builds from.

State lives in <work>/<recipe>/: fetch.json (what was fetched, see kvmlab.source.fetch) and patch.json
(source sha256, the builder's applied series with patch hashes, and the sha256 of every file the
series touched). ``prepare`` is a no-op when the source hash and the requested series equal the
recorded ones; when either differs the tree is unpacked afresh (the cache keeps the pristine
tarball) and the series applied to it.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmlab.core.fsutil import atomic_write_json, read_json, replace_dir
from kvmlab.core.settings import Settings
from kvmlab.model.recipe import Recipe
from kvmlab.source.fetch import FetchOptions, FetchResult, fetch_source
from kvmlab.source.patch import apply_series, read_series
from kvmlab.source.tar import extract


@dataclass(frozen=True)
class PreparedSource:
    src_dir: Path
    source_sha256: str
    patches: list[dict]              # [{"name", "sha256"}] applied, in order
    fetched: FetchResult | None = None
    unpacked: bool = False           # the tree was (re)created in this run
    noop: bool = False               # nothing changed
    skipped: list[str] = field(default_factory=list)  # conditional patches left out


def patch_stamp_path(settings: Settings, recipe: Recipe) -> Path:
    return settings.work(recipe.name) / "patch.json"


def read_patch_stamp(settings: Settings, recipe: Recipe) -> dict[str, Any]:
    try:
        data = read_json(patch_stamp_path(settings, recipe), {})
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def prepare(settings: Settings, recipe: Recipe, builder: str, *, source: str | Path | None = None,
            offline: bool = False, force: bool = False, dry_run: bool = False,
            options: FetchOptions | None = None) -> PreparedSource:
    """Fetch (or take --source), unpack and patch the recipe's source for builder.

    The tree is built in a temp dir (unpack, then the series applied there) and renamed to
    <work>/<recipe>/src only when every patch applied, so a failure leaves the old tree as it was.
    force: rebuild the tree even when nothing changed (the download cache is reused; it is
    verified on every use). dry_run: build the tree and throw it away.
    """
    entries = read_series(settings.patches_dir, recipe, builder)  # fail early on a bad series
    fetched = fetch_source(settings, recipe, source=source, offline=offline, options=options)
    want = [e.record() for e in entries if e.active]
    skipped = [e.name for e in entries if not e.active]
    src = settings.work(recipe.name) / "src"
    state = read_patch_stamp(settings, recipe)
    if not (force or dry_run) and src.is_dir() and \
            state.get("source_sha256") == fetched.sha256 and state.get("patches") == want:
        return PreparedSource(src, fetched.sha256, want, fetched, noop=True, skipped=skipped)

    src.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".src.new-", dir=src.parent) as tmp:
        tree = Path(tmp) / "src"
        extract(fetched.path, fetched.kind, tree, recipe.source.strip_components)
        files = apply_series(tree, entries, scratch=False)  # PatchError: src untouched
        if dry_run:
            return PreparedSource(src, fetched.sha256, want, fetched, noop=True, skipped=skipped)
        patch_stamp_path(settings, recipe).unlink(missing_ok=True)
        replace_dir(tree, src)
    atomic_write_json(patch_stamp_path(settings, recipe), {
        "recipe": recipe.name, "builder": builder, "src_dir": str(src),
        "source_sha256": fetched.sha256, "source_kind": fetched.kind,
        "series": str(recipe.series_path(settings.patches_dir, builder) or ""),
        "patches": want, "files": files, "skipped": skipped})
    return PreparedSource(src, fetched.sha256, want, fetched, unpacked=True, skipped=skipped)
