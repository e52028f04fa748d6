"""unpack: a fetched source (tarball, source RPM with its %prep, or directory) into a new tree.

A tarball is extracted by kvmlab.source.tar (checked, top directories stripped); a directory is
copied; a source RPM (recipe source.format = "srpm", told apart by kvmlab.source.srpm.is_srpm)
becomes the tree its %prep makes: Source0 (and ``%setup -a N`` sources) extracted with the same
checked tar extraction, then the spec's own patch steps (kvmlab.source.spec) applied with the one
patch runner (kvmlab.source.patchrun), with the spec's levels. :func:`unpack_srpm` is atomic like
everything here: on any error the destination is left as it was. The recipe's compat series
(kvmlab.source.patch) is applied on top by kvmlab.source.prepare. A plain tree given with
--source (a tarball of an already patched tree, e.g. a git export of the RHEL tree) is not an
SRPM: only the compat series applies then.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmlab.core.errors import UnpackError
from kvmlab.core.fsutil import replace_dir, sha256_file
from kvmlab.source.patchrun import PatchJob, apply_patch
from kvmlab.source.spec import PrepStep, SpecInfo, parse_spec
from kvmlab.source.srpm import RpmInfo, SrpmError, extract_rpm, is_srpm
from kvmlab.source.tar import extract_tar


def extract(path: Path, kind: str, tree: Path, strip: int = 1) -> None:
    """Create the new directory tree from a tarball or source RPM (kind "tarball") or as a copy
    of a directory (kind "dir").

    Callers extract into a temp dir next to the final place and rename it there when done."""
    if kind != "dir":
        if is_srpm(path):  # source format "srpm": Source0 + the spec's %prep patches
            unpack_srpm(path, tree)
            return None
        return extract_tar(path, tree, strip)
    try:
        shutil.copytree(path, tree, symlinks=True)
    except (OSError, shutil.Error) as e:
        raise UnpackError(f"cannot copy source directory {path}: {e}") from None


@dataclass(frozen=True)
class SrpmTree:
    src_dir: Path
    rpm: RpmInfo
    spec: SpecInfo
    spec_file: str
    applied: list[dict[str, Any]]  # {"name", "sha256", "number", "strip", "fuzz", "args"}
    skipped: list[str]             # optional patches not in the RPM


def apply_step(tree: Path, sources: Path, step: PrepStep) -> dict[str, Any] | None:
    """Apply one %prep step to tree; None when an optional patch is absent."""
    path = sources / step.file
    what = f"Patch{step.number} ({step.file})" if step.number is not None else step.file
    if not path.is_file():
        if step.optional:
            return None
        raise SrpmError(f"{what} is listed in the spec (line {step.line}: {step.directive!r}) "
                        "but is not in the source RPM",
                        hint="the source RPM is incomplete or the spec is wrong; get a complete "
                             "source RPM")
    levels = ([f"-p{step.strip}"] if step.strip is not None else []) + [f"-F{step.fuzz}"]
    apply_patch(tree, PatchJob(path, what, step.strip, step.fuzz, step.args,
                               where=f" with {' '.join(levels)} (spec line {step.line})"),
                error=SrpmError,
                hint="the spec's own patches must apply as rpmbuild would apply them; the "
                     "source RPM may be damaged or not match its spec")
    return {"name": step.file, "sha256": sha256_file(path), "number": step.number,
            "strip": step.strip, "fuzz": step.fuzz, "args": list(step.args)}


def find_spec(sources: Path, label: str) -> Path:
    specs = sorted(p for p in sources.iterdir() if p.suffix == ".spec" and p.is_file())
    if len(specs) != 1:
        names = f" ({', '.join(p.name for p in specs)})" if specs else ""
        raise SrpmError(f"{label}: expected exactly one .spec file in the source RPM, found "
                        f"{len(specs)}{names}")
    return specs[0]


def _setup_tree(spec: SpecInfo, spec_name: str, sources: Path, tmp: Path) -> Path:
    """The tree %setup makes: Source0 (top directory stripped unless -c), then %setup -a N."""
    tree = tmp / "tree"
    setup = spec.setup
    if not setup and not spec.prep:
        raise SrpmError(f"{spec_name}: %prep has no %setup/%autosetup",
                        hint="kvmlab needs %setup to know which tarball holds the tree")
    if setup.get("no_source"):
        tree.mkdir()
    else:
        if 0 not in spec.sources:
            raise SrpmError(f"{spec_name}: no Source0 line")
        archive = sources / spec.sources[0]
        if not archive.is_file():
            raise SrpmError(f"Source0 ({spec.sources[0]}) is listed in the spec but is not "
                            "in the source RPM", hint="get a complete source RPM")
        extract_tar(archive, tree, 0 if setup.get("create") else 1)
    for n in setup.get("after", []):
        if n not in spec.sources or not (sources / spec.sources[n]).is_file():
            raise SrpmError(f"%setup -a {n}: Source{n} is not in the source RPM")
        sub = tmp / f"source{n}"
        extract_tar(sources / spec.sources[n], sub, 0)
        for child in sub.iterdir():
            os.replace(child, tree / child.name)
    return tree


def unpack_srpm(srpm: Path, dest: Path, *, keep_sources: Path | None = None) -> SrpmTree:
    """Replace dest with the source RPM's tree after its %prep patches (atomic: on any error dest
    is left as it was). keep_sources: also copy the RPM's files (spec, patches) there."""
    srpm = Path(srpm)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.srpm-", dir=dest.parent))
    try:
        sources = tmp / "SOURCES"
        info, _ = extract_rpm(srpm, sources)
        spec_path = find_spec(sources, srpm.name)
        spec = parse_spec(spec_path.read_text(errors="replace"), label=spec_path.name,
                          rpm_tags={"name": info.name, "version": info.version,
                                    "release": info.release})
        tree = _setup_tree(spec, spec_path.name, sources, tmp)
        applied, skipped = [], []
        for step in spec.prep:
            rec = apply_step(tree, sources, step)
            if rec is None:
                skipped.append(step.file)
            else:
                applied.append(rec)
        if keep_sources is not None:
            keep_sources.parent.mkdir(parents=True, exist_ok=True)
            if keep_sources.exists():
                shutil.rmtree(keep_sources)
            shutil.copytree(sources, keep_sources)
        replace_dir(tree, dest)
        return SrpmTree(dest, info, spec, spec_path.name, applied, skipped)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
