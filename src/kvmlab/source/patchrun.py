"""patchrun: the one patch runner: apply one patch file to a tree with patch(1), or change nothing.

Used by the recipe's series (kvmlab.source.patch: ``-p1``, no fuzz) and by a source RPM's %prep
(kvmlab.source.unpack: the spec's own ``-pN`` and ``-F N``, which is 0 unless the spec or RHEL's
``patch_command`` says otherwise). Every patch is first applied with ``--dry-run``; only when that
succeeds is it applied for real, so a patch that does not apply leaves the tree as it was (no
half-applied hunks, no .rej/.orig files). ``.gz``/``.bz2``/``.xz`` patches are decompressed here.
Reversed or already applied patches are refused (``-N``), never silently skipped.
The error names the patch, the file and the hunk (:func:`explain`).
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmlab.core import proc
from kvmlab.core.errors import KvmlabError, PatchError

PATCH_TIMEOUT = 300
_OPENERS: dict[str, Callable[..., Any]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


@dataclass(frozen=True)
class PatchJob:
    """One patch to apply, and how."""
    path: Path
    what: str                      # how messages name it: "patch 1.patch", "Patch3 (x.patch)"
    strip: int | None = 1          # -pN; None: no -p (patch(1)'s own default, as rpm does)
    fuzz: int = 0                  # -F N
    args: tuple[str, ...] = ()     # further patch(1) options (-R, -E, -d DIR)
    where: str = ""                # appended to "does not apply", e.g. " with -p1 -F0 (line 9)"

    def argv(self, dry_run: bool) -> list[str]:
        levels = ([f"-p{self.strip}"] if self.strip is not None else []) + [f"-F{self.fuzz}"]
        return ["patch", *levels, "-N", "--batch", "--no-backup-if-mismatch", "-r", "-",
                *(["--dry-run"] if dry_run else []), *self.args]


def _input(path: Path) -> bytes:
    opener = _OPENERS.get(path.suffix)
    if opener is None:
        return path.read_bytes()
    with opener(path, "rb") as f:
        data: bytes = f.read()
    return data


def explain(output: str) -> str:
    """What went wrong, from patch(1)'s output: file and hunk."""
    problems, current = [], "?"
    for line in output.splitlines():
        if m := re.match(r"(?:patching|checking) file (.+)", line):
            current = m.group(1).strip("'\"")
        elif m := re.match(r"Hunk #(\d+) FAILED at (\d+)", line):
            problems.append(f"{current}: hunk #{m.group(1)} FAILED at line {m.group(2)}")
        elif "Reversed (or previously applied) patch detected" in line:
            problems.append(f"{current}: already applied (or reversed)")
        elif m := re.match(r"\|?\+\+\+ (?:b/)?(\S+)", line):
            current = m.group(1)
        elif "can't find file to patch" in line:
            problems.append(f"file to patch not found ({line.strip()})")
        elif "No file to patch" in line and problems and "not found" in problems[-1]:
            problems[-1] = f"{current}: file to patch not found"
        elif "malformed patch" in line or "Only garbage" in line:
            problems.append(line.replace("patch: **** ", "").strip())
    return "; ".join(problems) or (output.strip().splitlines() or ["no output"])[-1]


def apply_patch(tree: Path, job: PatchJob, *, error: type[KvmlabError] = PatchError,
                hint: str | None = None, timeout: float = PATCH_TIMEOUT) -> set[str]:
    """Apply job to tree, all or nothing (dry run first); return the files it touched.
    A patch that does not apply raises ``error`` ("WHAT does not apply WHERE: DETAIL")."""
    data = _input(job.path)
    for dry_run in (True, False):
        p = proc.run(job.argv(dry_run), cwd=tree, input=data, text=False, timeout=timeout,
                     what=f"patch ({job.what})")
        out = (p.stdout + p.stderr).decode(errors="replace")
        if p.returncode != 0:
            raise error(f"{job.what} does not apply{job.where}: {explain(out)}", hint=hint)
    return {m.strip("'\"") for m in re.findall(r"^patching file (.+)$", out, re.M)}
