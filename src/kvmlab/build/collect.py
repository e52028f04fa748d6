"""Collecting a build's outputs: artifacts copied to out/ with a manifest, all or nothing.

``publish(out, fill)`` is the one collector (qemu builds and kmod builds): ``fill`` copies the
artifacts into a temp dir next to out/ and returns the manifest; it is written there and the
dir swapped into place with kvmlab.core.fsutil.replace_dir, so out/ is never half-written and a
failed collection keeps the previous output. ``up_to_date`` is the build's no-op decision: the
recorded manifest (old manifest.json files are read as they are), its artifacts intact, and the
build tree's "completed" Stamp for the same inputs.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kvmlab.build.deps import RUNTIME_DEPS
from kvmlab.build.layout import MANIFEST
from kvmlab.core import ui
from kvmlab.core.elf import elf_needed
from kvmlab.core.errors import BuildError
from kvmlab.core.fsutil import json_sha256, read_json, replace_dir, sha256_file
from kvmlab.core.stamps import Stamp
from kvmlab.model.manifests import BuildManifest
from kvmlab.model.recipe import Recipe

DONE_FILE = ".kvmlab-built"  # in the build tree: the Stamp of the build that completed there
# (artifacts key, kind, sub directory of out/)
KINDS = (("binaries", "binary", "bin"), ("firmware", "firmware", "pc-bios"),
         ("option_roms", "option_rom", "pc-bios"))

# given (artifact path, its source in the build tree, DT_NEEDED) of every dynamically linked
# ELF artifact: the manifest's runtime_deps list (kvmlab.build.deps)
DepsFn = Callable[[list[tuple[str, Path, list[str]]]], list[dict]]


def publish(out: Path, fill: Callable[[Path], dict]) -> dict:
    """Fill a temp dir next to out/, write its manifest, swap it into place; the manifest."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        # through the typed record: what is written is what every reader (install, lab --check,
        # the checks) can read back as a BuildManifest
        manifest = BuildManifest.from_dict(fill(tmp)).to_dict()
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        os.chmod(tmp, 0o755)
        replace_dir(tmp, out)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_artifact(src: Path, tmp: Path, rel: str, kind: str, source: str,
                  **extra: Any) -> dict[str, Any]:
    """Copy src to tmp/rel; its manifest entry (path, kind, source, sha256, size, mode)."""
    dest = tmp / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dest)
    st = dest.stat()
    return {"path": rel, "kind": kind, "source": source, **extra, "sha256": sha256_file(dest),
            "size": st.st_size, "mode": "%04o" % (st.st_mode & 0o7777)}


def _files(recipe: Recipe, bdir: Path, tmp: Path) -> list[dict]:
    arts, missing_bins = [], []
    for key, kind, sub in KINDS:
        for rel in recipe.artifacts.get(key, ()):
            src = bdir / rel
            if src.is_file():
                arts.append(copy_artifact(src, tmp, f"{sub}/{Path(rel).name}", kind, rel))
            elif kind == "binary":
                missing_bins.append(rel)
            else:
                ui.warn(f"{kind.replace('_', ' ')} {rel} was not built/found in {bdir}; skipped")
    if missing_bins:
        raise BuildError(f"build finished but {len(missing_bins)} binary(ies) are missing: "
                         + ", ".join(missing_bins),
                         hint=f"check the recipe's artifacts.binaries against {bdir}")
    return arts


def _data_dirs(recipe: Recipe, bdir: Path, tmp: Path) -> list[dict]:
    """Directories of data files (keymaps): copied whole, kept as pc-bios/<dir>/..."""
    arts = []
    for rel in recipe.artifacts.get("data_dirs", ()):
        src_dir = bdir / rel
        if not src_dir.is_dir():
            ui.warn(f"data directory {rel} was not found in {bdir}; skipped")
            continue
        for src in sorted(p for p in src_dir.rglob("*") if p.is_file()):
            sub_rel = src.relative_to(src_dir).as_posix()
            arts.append(copy_artifact(src, tmp, f"pc-bios/{src_dir.name}/{sub_rel}", "data",
                                      f"{rel}/{sub_rel}"))
    return arts


def collect(recipe: Recipe, builder: str, bdir: Path, out: Path, manifest: dict,
            deps: DepsFn | None = None) -> dict:
    """A qemu build's artifacts (binaries, firmware, option ROMs, data dirs) into out/."""
    def fill(tmp: Path) -> dict:
        t0 = time.monotonic()
        arts = _files(recipe, bdir, tmp) + _data_dirs(recipe, bdir, tmp)
        if isinstance(manifest.get("timings"), dict):   # the build's phases: copying artifacts
            manifest["timings"]["collect"] = round(time.monotonic() - t0, 3)
        full = {**manifest, "artifacts": arts}
        if deps is not None:
            elves = [(a["path"], bdir / a["source"], needed) for a in arts
                     if (needed := elf_needed(tmp / a["path"]))]
            full[RUNTIME_DEPS] = deps(elves)
        return full
    return publish(out, fill)


# --------------------------------------------------------------------------------------------
# no-op decision

def read_manifest(out: Path) -> dict | None:
    try:
        m = read_json(out / MANIFEST, None)
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def completed_stamp(bdir: Path) -> Stamp:
    """The build tree's record of the inputs whose build completed there (a new tree has none)."""
    return Stamp(bdir / DONE_FILE, "build")


def artifacts_intact(out: Path, manifest: Mapping[str, Any]) -> bool:
    """Every artifact the manifest lists is in out/ with its recorded size and sha256."""
    try:
        for a in manifest.get("artifacts", []):
            p = out / a["path"]
            if not p.is_file() or p.stat().st_size != a["size"] or sha256_file(p) != a["sha256"]:
                return False
    except (OSError, KeyError, TypeError):
        return False
    return True


def outputs_intact(out: Path, manifest: Mapping[str, Any]) -> bool:
    """The artifacts are intact and the kept build tree is the one that produced them (not a
    later, failed one)."""
    bd = manifest.get("build_dir")
    if not bd or not manifest.get("artifacts") or not artifacts_intact(out, manifest):
        return False
    done = completed_stamp(Path(bd)).read()
    return done is not None and done.get("inputs_sha256") == manifest.get("inputs_sha256")


def up_to_date(out: Path, inputs: Mapping[str, Any]) -> dict | None:
    """The recorded manifest when a build with these inputs completed and its outputs are intact."""
    recorded = read_manifest(out)
    if recorded is None or recorded.get("inputs_sha256") != json_sha256(dict(inputs)):
        return None
    return recorded if outputs_intact(out, recorded) else None
