"""lock: kvmlab.lock, the sha256 of every source that has no pin in its recipe (like go.sum).

JSON ``{"comment", "sources": {"recipe/file": {"sha256", "url", "recorded"}}}``. The first fetch
of an unpinned source records it with a loud warning; every later fetch must match it; ``--relock``
replaces an entry (never a recipe's pin).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from kvmlab.core import ui
from kvmlab.core.errors import FetchError
from kvmlab.core.fsutil import atomic_write_json, read_json
from kvmlab.core.records import utc_stamp
from kvmlab.core.settings import Settings
from kvmlab.model.recipe import Recipe


def lock_key(recipe: Recipe) -> str:
    return f"{recipe.name}/{recipe.source.file}"


def read_lock(path: Path) -> dict[str, Any]:
    try:
        data = read_json(path, {})
    except ValueError as e:
        raise FetchError(f"lock file {path} is not valid JSON: {e}",
                         hint="fix or delete it (entries are re-recorded on the next fetch)")
    if not isinstance(data, dict) or not isinstance(data.get("sources", {}), dict):
        raise FetchError(f"lock file {path} has an unexpected layout",
                         hint='expected {"sources": {"recipe/file": {"sha256": ...}}}')
    return data


def expected_sha256(settings: Settings, recipe: Recipe) -> tuple[str | None, str]:
    """(sha256, "pinned" | "locked") or (None, "unknown") when neither pinned nor locked yet."""
    if recipe.source.pinned:
        return recipe.source.sha256, "pinned"
    entry = read_lock(settings.lock).get("sources", {}).get(lock_key(recipe))
    if isinstance(entry, dict) and isinstance(entry.get("sha256"), str):
        return entry["sha256"], "locked"
    return None, "unknown"


def record_lock(settings: Settings, recipe: Recipe, sha: str, origin: str,
                 relock: bool = False) -> None:
    data = read_lock(settings.lock)
    entries = data.setdefault("sources", {})
    old = entries.get(lock_key(recipe))
    if relock and isinstance(old, dict) and old.get("sha256") == sha:
        return  # unchanged: the entry (and its date) stays as it is
    data.setdefault("comment", "source checksums recorded on first fetch by kvmlab (like go.sum); "
                               "commit this file, every later fetch must match")
    entries[lock_key(recipe)] = {
        "sha256": sha, "url": origin,
        "recorded": utc_stamp()}
    atomic_write_json(settings.lock, data)
    if not relock:
        ui.warn(f"[bold]{recipe.source.file} has no pinned sha256: recorded {sha} (from {origin}) "
                f"in {settings.lock}[/bold]. Check it against a trusted source; every later fetch "
                f"must match it.")


def relock_hint(recipe: Recipe, settings: Settings, local: str | None) -> str:
    cmd = f"invoke fetch --recipe {recipe.name}" + (f" --source {local}" if local else "")
    return f"`{cmd} --relock` replaces the entry in {settings.lock}, showing the old and new hash"
