"""patch: read, lint and apply a recipe's patch series for a builder, all or nothing, no fuzz.

Series file (patches/<recipe>/<builders.NAME.series>): one patch file per line, '#' starts a
comment, and an optional condition ``FILE if=OPTION`` applies FILE only when the recipe option
OPTION is true (options: the recipe's [options] table).

Every patch listed must start with a header (before the diff) carrying these fields:

    Fixes: what breaks without it
    For: the compiler/library/kernel that needs it, e.g. "gcc 12", "GnuTLS >= 3.4"
    Failing-log: the failing build/log line that made it necessary
    Upstream: <url> | N/A: reason

(a value may continue on indented lines; other header lines such as Subject: are free).

The series is applied by the one patch runner (kvmlab.source.patchrun: ``patch -p1 -F0 -N``, dry
run first) in a scratch copy of the tree; only when every patch applied does the scratch tree
replace the real one (so a failure leaves it byte-identical). The error names the patch, the file
and the hunk.
"""
from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kvmlab.core.errors import PatchError
from kvmlab.core.fsutil import replace_dir, sha256_file
from kvmlab.model.recipe import Recipe
from kvmlab.source.patchrun import PatchJob, apply_patch

HEADER_FIELDS = {
    "Fixes": "what the patch fixes",
    "For": "which compiler/library/kernel needs it",
    "Failing-log": "the failing log line that made it necessary",
    "Upstream": "<url> | N/A: reason",
}
_DIFF_START = re.compile(r"^(--- |diff |Index: )", re.M)
_UPSTREAM_OK = re.compile(r"^(https?://\S+|N/A:\s*\S.*)$")


@dataclass(frozen=True)
class SeriesEntry:
    name: str
    path: Path
    condition: str | None  # recipe option that must be true, or None
    active: bool
    line: int

    def record(self) -> dict[str, str]:
        return {"name": self.name, "sha256": sha256_file(self.path)}


def _truthy(v: object) -> bool:
    return v is True or (isinstance(v, str) and v.strip().lower() in {"1", "yes", "true", "on"})


def lint_patch(path: Path) -> list[str]:
    """Problems with a series patch's header (empty when fine)."""
    text = path.read_text(errors="replace")
    m = _DIFF_START.search(text)
    if not m or not re.search(r"^\+\+\+ ", text[m.start():], re.M):
        return ["no unified diff in it (no '--- a/FILE' / '+++ b/FILE' lines)"]
    fields: dict[str, str] = {}
    key = None
    for line in text[:m.start()].splitlines():
        if key and line[:1] in (" ", "\t"):
            fields[key] = f"{fields[key]} {line.strip()}".strip()
            continue
        name, sep, value = line.partition(":")
        key = name if sep and name in HEADER_FIELDS and name not in fields else None
        if key:
            fields[key] = value.strip()
    problems = [f"header field '{k}:' ({HEADER_FIELDS[k]}) is missing or empty"
                for k in HEADER_FIELDS if not fields.get(k)]
    if fields.get("Upstream") and not _UPSTREAM_OK.match(fields["Upstream"]):
        problems.append(f"'Upstream: {fields['Upstream']}' must be a URL or 'N/A: reason'")
    return problems


def read_series(patches_dir: Path, recipe: Recipe, builder: str) -> list[SeriesEntry]:
    """The builder's series (every entry, active or not), linted; [] when it has none."""
    series = recipe.series_path(patches_dir, builder)
    if series is None:
        return []
    try:
        text = series.read_text()
    except OSError as e:
        raise PatchError(f"cannot read the patch series {series}: {e.strerror}",
                         hint=f"create it (it may be empty) or set builders.{builder}.series = "
                              f"\"\" in {recipe.path}") from None
    entries: list[SeriesEntry] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        where = f"{series}:{lineno}"
        name, rest = words[0], words[1:]
        if len(rest) > 1 or rest and not re.fullmatch(r"if=[\w.-]+", rest[0]) or \
                ".." in Path(name).parts or name.startswith("/"):
            raise PatchError(f"{where}: cannot parse {raw.strip()!r}",
                             hint="one patch per line: FILE or FILE if=OPTION; '#' comments")
        cond = rest[0][3:] if rest else None
        if cond is not None and cond not in recipe.options:
            raise PatchError(f"{where}: unknown option {cond!r} in 'if={cond}'",
                             hint=f"options of {recipe.name}: "
                                  + (", ".join(sorted(recipe.options)) or "none") +
                                  f" (the [options] table of {recipe.path})")
        path = series.parent / name
        if not path.is_file():
            raise PatchError(f"{where}: patch file {path} not found")
        problems = lint_patch(path)
        if problems:
            raise PatchError(f"{path}: " + "; ".join(problems),
                             hint="every series patch starts with a header: " +
                                  "; ".join(f"{k}: {v}" for k, v in HEADER_FIELDS.items()) +
                                  " (see patches/README.md)")
        entries.append(SeriesEntry(name, path, cond,
                                   cond is None or _truthy(recipe.options[cond]), lineno))
    return entries


def _apply_one(tree: Path, entry: SeriesEntry) -> set[str]:
    return apply_patch(tree, PatchJob(entry.path, f"patch {entry.name}", strip=1, fuzz=0),
                       hint="patches apply with no fuzz (-F0): refresh it against this source or "
                            "drop it from the series; the tree was left unchanged")


def apply_series(src: Path, entries: list[SeriesEntry], *, dry_run: bool = False,
                 scratch: bool = True) -> dict[str, str | None]:
    """Apply the active entries to src, all or nothing; return touched file -> sha256 (None when
    a patch deleted it). The patches go to a scratch copy that replaces src only when all applied
    (dry_run: never). scratch=False: src is itself a throw-away tree, patch it directly."""
    active = [e for e in entries if e.active]
    if not active:
        return {}
    if not scratch:
        touched: set[str] = set()
        for e in active:
            touched |= _apply_one(src, e)
        return {f: sha256_file(src / f) if (src / f).is_file() else None for f in sorted(touched)}
    tmp = Path(tempfile.mkdtemp(prefix=f".{src.name}.patch-", dir=src.parent))
    try:
        tree = tmp / src.name
        shutil.copytree(src, tree, symlinks=True)
        files = apply_series(tree, entries, scratch=False)
        if not dry_run:
            replace_dir(tree, src)
        return files
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
