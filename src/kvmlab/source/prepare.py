"""prepare: fetch + unpack + patch, the source tree every later step builds from.

State lives in <work>/<recipe>/: fetch.json (what was fetched, see kvmlab.source.fetch) and
patch.json, a kvmlab.core.stamps.Stamp whose inputs are the source sha256 and the builder's
applied series with patch hashes, and whose record adds the sha256 of every file the series
touched. ``prepare`` is a no-op when those inputs equal the recorded ones; when either differs the
tree is unpacked afresh (the cache keeps the pristine tarball) and the series applied to it.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmlab.core.fsutil import read_json, replace_dir
from kvmlab.core.settings import Settings
from kvmlab.core.stamps import Stamp
from kvmlab.model.recipe import Recipe
from kvmlab.source.fetch import FetchOptions, FetchResult, fetch_source
from kvmlab.source.patch import apply_series, read_series
from kvmlab.source.unpack import extract


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


def patch_stamp(settings: Settings, recipe: Recipe) -> Stamp:
    """The patch step's "unchanged inputs" record: inputs {source_sha256, patches}."""
    return Stamp(patch_stamp_path(settings, recipe), "patch")


def read_patch_stamp(settings: Settings, recipe: Recipe) -> dict[str, Any]:
    """What the last patch run recorded ({} when nothing): {recipe, builder, src_dir,
    source_sha256, source_kind, series, patches, files, skipped}. A patch.json written before
    the Stamp format (the same keys at its top) is still read here, though it is never fresh."""
    data = patch_stamp(settings, recipe).read()
    if data is not None:
        record = data.get("record")
        return record if isinstance(record, dict) else {}
    try:
        legacy = read_json(patch_stamp_path(settings, recipe), {})
    except (OSError, ValueError):
        return {}
    return legacy if isinstance(legacy, dict) and "schema" not in legacy else {}


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
    stamp = patch_stamp(settings, recipe)
    inputs = {"source_sha256": fetched.sha256, "patches": want}
    if not (force or dry_run) and src.is_dir() and stamp.fresh(inputs) is not None:
        return PreparedSource(src, fetched.sha256, want, fetched, noop=True, skipped=skipped)

    src.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".src.new-", dir=src.parent) as tmp:
        tree = Path(tmp) / "src"
        extract(fetched.path, fetched.kind, tree, recipe.source.strip_components)
        files = apply_series(tree, entries, scratch=False)  # PatchError: src untouched
        if dry_run:
            return PreparedSource(src, fetched.sha256, want, fetched, noop=True, skipped=skipped)
        stamp.clear()
        replace_dir(tree, src)
    stamp.write(inputs, {
        "recipe": recipe.name, "builder": builder, "src_dir": str(src),
        "source_sha256": fetched.sha256, "source_kind": fetched.kind,
        "series": str(recipe.series_path(settings.patches_dir, builder) or ""),
        "patches": want, "files": files, "skipped": skipped})
    return PreparedSource(src, fetched.sha256, want, fetched, unpacked=True, skipped=skipped)
