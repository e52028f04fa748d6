"""install-bios: put the firmware where the binary really looks -- plan the directories it
searches, apply the files as one transaction, and prove it starts (explain it when it does not).

Firmware lookup: qemu-kvm 0.12 searches exactly one directory: ``-L DIR``; else
``realpath(exe)/../../share/qemu`` if it exists, else ``.../pc-bios``; else the compiled-in
CONFIG_QEMU_SHAREDIR (manifest config.datadir). Newer qemu (e.g. Debian's 7.2) searches a list
that ``-L help`` prints. In both cases the binary is also run briefly (kvmlab.install.probe) to
observe the paths it really tries; a directory it tries that the plan missed is added and the
files installed there too, until it starts or nothing more can be learned.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmlab.core.errors import InstallError
from kvmlab.core.fsutil import sha256_file
from kvmlab.core.records import to_jsonable
from kvmlab.core.settings import Settings
from kvmlab.install.binaries import binary_path, load_build
from kvmlab.install.probe import ProbeRun, qemu_version, run_probe
from kvmlab.install.txn import (
    QEMU_NAME,
    FileRow,
    Item,
    apply,
    open_manifest,
    recipe_of,
    save_manifest,
    target,
)
from kvmlab.model.manifests import BuildManifest, InstallManifest, InstallTarget
from kvmlab.model.recipe import Recipe
from kvmlab.qemu.binary import l_help as qemu_l_help
from kvmlab.qemu.binary import version_tuple

# names a qemu binary asks for in its data dirs (the BIOS is what decides where it searches)
BIOS_RE = re.compile(r"^bios(-256k)?\.bin$")
Source = tuple[Path, str, str]          # (file, sha256, kind)


@dataclass
class SearchInfo:
    qemu: Path
    version: str
    dirs: list[Path]            # where firmware goes: every directory the binary searches
    method: str
    explain: list[tuple[str, str, str]]   # (source, directory, note)
    compiled_datadir: str | None
    probe: ProbeRun | None


@dataclass
class BiosResult:
    qemu: Path
    search: SearchInfo
    rows: list[FileRow]
    noop: bool
    proof: ProbeRun | None
    manifest_path: Path | None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)


# ---------------------------------------------------------------------------------------------
# plan: where this binary looks
def _compiled_datadirs(qemu: Path, hint: str | None) -> str | None:
    """The compiled-in data dir: the build's record, else a string in the binary."""
    if hint:
        return hint
    try:
        data = Path(qemu).read_bytes()
    except OSError:
        return None
    for mo in re.finditer(rb"(/[A-Za-z0-9_./+-]{1,200}/share/qemu)\x00", data):
        return mo.group(1).decode()
    return None


def _rule_012(real: Path, compiled: str | None, share_suffix: str,
              explain: list[tuple[str, str, str]]) -> Path:
    """The one directory qemu-kvm 0.12 searches (with the reasoning appended to explain)."""
    up = real.parent.parent
    share, pcb = up / share_suffix, up / "pc-bios"
    explain.append(("0.12 rule: -L", "(not given)", "-L DIR would win"))
    explain.append(("0.12 rule: exe", str(real), "realpath of the binary"))
    explain.append(("0.12 rule: 1st", str(share), "exists: used" if share.is_dir() else "absent"))
    explain.append(("0.12 rule: 2nd", str(pcb),
                    "exists: used" if pcb.is_dir() and not share.is_dir() else
                    ("exists, but share/qemu wins" if pcb.is_dir() else "absent")))
    explain.append(("0.12 rule: 3rd", compiled or "?",
                    "compiled-in CONFIG_QEMU_SHAREDIR, used when neither exists"))
    return pcb if pcb.is_dir() and not share.is_dir() else share


def _bios_names(run: ProbeRun, d: Path, found: bool) -> set[str]:
    return {os.path.basename(p) for p, ok in run.attempts
            if ok == found and os.path.dirname(p) == str(d) and BIOS_RE.match(os.path.basename(p))}


def _observed(run: ProbeRun, explain: list[tuple[str, str, str]]) -> list[Path]:
    """The directories the probe saw it try for the BIOS, in order (explained)."""
    seen: list[Path] = []
    for p, _ in run.attempts:
        d = Path(os.path.dirname(p))
        if BIOS_RE.match(os.path.basename(p)) and d not in seen:
            seen.append(d)
    for d in seen:
        hits = sorted(_bios_names(run, d, True))
        misses = sorted(_bios_names(run, d, False) - set(hits))
        explain.append(("observed (strace)" if run.strace else "reported by the binary", str(d),
                        "; ".join(([f"found {', '.join(hits)}"] if hits else []) +
                                  ([f"looked for {', '.join(misses)}: absent"] if misses
                                   else []))))
    for d_, how in run.reported_dirs:
        explain.append(("reported (debug-bios-path)", d_, how))
    if run.missing_fatal:
        explain.append(("observed (stderr)", "", "missing: " + ", ".join(run.missing_fatal)))
    return seen


def find_search_dirs(qemu: Path, *, datadir_hint: str | None = None, probe: bool = True,
                     timeout: float = 20, share_suffix: str = "share/qemu") -> SearchInfo:
    """Where this binary looks for bios.bin & co (after install-bios creates its data dir)."""
    qemu = Path(qemu)
    version = qemu_version(qemu)
    explain: list[tuple[str, str, str]] = []
    compiled = None
    real = Path(os.path.realpath(qemu))
    lhelp = qemu_l_help(qemu) if version_tuple(version) >= (2, 0) else None
    if lhelp:
        dirs, method = list(lhelp), "-L help"
        explain += [("qemu -L help", str(d), "searched in this order") for d in lhelp]
    else:
        compiled = _compiled_datadirs(real, datadir_hint)
        dirs, method = [_rule_012(real, compiled, share_suffix, explain)], "0.12 rule"
    run = run_probe(qemu, timeout=timeout) if probe else None
    seen = _observed(run, explain) if run else []
    up = real.parent.parent
    allowed = {up / share_suffix, up / "pc-bios"} | ({Path(compiled)} if compiled else set())
    if method == "0.12 rule" and seen and not set(seen) <= allowed:
        # the binary does not behave like 0.12: trust what it did
        dirs, method = seen, "observed (strace)"
        explain.append(("decision", ", ".join(map(str, dirs)),
                        "the binary searched elsewhere than the 0.12 rule predicts: "
                        "using what it tried"))
    elif method == "-L help":
        dirs += [d for d in seen if d not in dirs]
    return SearchInfo(qemu, version, dirs, method, explain, compiled, run)


# ---------------------------------------------------------------------------------------------
# the files and the binary
def _build_sources(settings: Settings, recipe: Recipe, builder: str, lenient: bool,
                   warnings: list[str]
                   ) -> tuple[dict[str, Source], list[str], BuildManifest | None]:
    """The build's firmware by name relative to the data dir (bios.bin, keymaps/en-us), the
    recipe's names in order, and the build manifest (None: no build and lenient)."""
    sources: dict[str, Source] = {}
    try:
        out, bm = load_build(settings, recipe, builder)
    except InstallError:
        if not lenient:
            raise
        return sources, [], None
    for a in bm.artifacts:
        if a.kind in ("firmware", "option_rom", "data"):
            sources[a.path.split("/", 1)[1]] = (out / a.path, a.sha256, a.kind)
    names = list(sources)
    for key in ("firmware", "option_roms"):
        for rel in recipe.artifacts.get(key, ()):
            if os.path.basename(rel) not in sources:
                warnings.append(f"{os.path.basename(rel)}: listed by the recipe ({key}) but not "
                                "in the build output")
    return sources, names, bm


def _find_installed_binary(m: InstallManifest, root: Path, recipe: Recipe) -> Path | None:
    cand = binary_path(recipe, root)
    for e in m.files:
        if (e.get("name") == QEMU_NAME or os.path.basename(e["path"]) == cand.name) and \
                e.get("kind") == "binary" and os.path.exists(e["path"]):
            return Path(e["path"])
    return cand if cand.exists() else None


def _which_binary(settings: Settings, recipe: Recipe, qemu: str | Path | None,
                  prefix: str | None, destdir: str | None
                  ) -> tuple[Path, InstallTarget, Path, InstallManifest]:
    """The binary to serve, its DESTDIR+PREFIX and that target's install manifest."""
    if qemu is not None:
        qpath = Path(os.path.abspath(os.path.expanduser(str(qemu))))
        if not qpath.exists():
            raise InstallError(f"--qemu {qemu}: no such file")
        if prefix is None and not destdir:
            prefix = str(Path(os.path.realpath(qpath)).parent.parent)
        t = target(prefix, destdir, recipe)
        return (qpath, t, *open_manifest(settings, t))
    t = target(prefix, destdir, recipe)
    mpath, m = open_manifest(settings, t)
    found = _find_installed_binary(m, t.root, recipe)
    if found is None:
        raise InstallError(f"no installed {QEMU_NAME} under {t.root}",
                           hint="run `invoke install` first (same --prefix/--destdir), or pass "
                                "--qemu PATH")
    return found, t, mpath, m


# ---------------------------------------------------------------------------------------------
# apply and prove
@dataclass
class _Plan:
    """What install-bios knows so far: files, where they go, what is done."""
    qemu: Path
    t: InstallTarget
    mpath: Path
    m: InstallManifest
    search: SearchInfo
    sources: dict[str, Source]
    extra_dirs: list[Path]
    recipe_names: list[str]
    compat: list[Path]
    warnings: list[str]
    targets: list[Path] = field(default_factory=list)
    done: set[str] = field(default_factory=set)
    missing: dict[str, FileRow] = field(default_factory=dict)

    def source_for(self, name: str) -> Source | None:
        if name in self.sources:
            return self.sources[name]
        for d in self.extra_dirs:
            p = d / name
            if p.is_file():
                rp = Path(os.path.realpath(p))
                return (rp, sha256_file(rp), "firmware")
        return None

    def add_targets(self, dirs: Iterable[Path]) -> list[Path]:
        added = []
        dd = self.t.destdir
        for d in dirs:
            # one directory reached two ways (a symlinked data dir) is written once
            if os.path.realpath(d) in {os.path.realpath(t) for t in self.targets}:
                continue
            if dd and not str(d).startswith(dd.rstrip("/") + "/"):
                self.warnings.append(f"the binary also searches {d}, outside --destdir {dd}: "
                                     "not writing there")
                continue
            self.targets.append(d)
            added.append(d)
        return added

    def bios_record(self) -> dict[str, Any]:
        return {"qemu": str(self.qemu), "version": self.search.version,
                "search_dirs": [str(d) for d in self.search.dirs],
                "compat_dirs": [str(d) for d in self.compat], "method": self.search.method,
                "files": sorted(self.done), "recipe_files": self.recipe_names}


def _put_names(plan: _Plan, names: list[str], dry_run: bool) -> list[FileRow]:
    """Install every name not done yet into every target directory (one transaction)."""
    items = []
    for n in names:
        src = plan.source_for(n) if n not in plan.done else None
        if src is None:
            continue
        items += [Item(d / n, src[0], src[1], 0o644, src[2], n) for d in plan.targets]
        plan.done.add(n)
    if not items:
        return []
    rows, txn = apply(items, plan.m, "install-bios", "install-bios", dry_run=dry_run)
    if not dry_run:
        plan.m.bios = plan.bios_record()
        save_manifest(plan.mpath, plan.m, txn)
    return rows


def _learn(plan: _Plan, proof: ProbeRun) -> tuple[list[str], list[Path]]:
    """From a trial start: names it asked for that we can supply, and directories it searched
    that the plan missed (now targets). Names we cannot supply become "missing" rows."""
    asked = proof.missing_fatal + proof.missing_warn
    more = [n for n in asked if n not in plan.done and plan.source_for(n)]
    for n in asked:
        if not plan.source_for(n) and n not in plan.missing:
            tried = proof.tried(n) or [str(d / n) for d in plan.targets]
            plan.missing[n] = FileRow(tried[0], "(no source)", "",
                                      "missing (fatal)" if n in proof.missing_fatal
                                      else "missing (warning)", name=n)
    # the binary looked somewhere we did not predict: believe it, install there too
    known = {os.path.realpath(t) for t in plan.targets}
    new_dirs: list[Path] = []
    for n in proof.missing_fatal:
        if not plan.source_for(n):
            continue          # installing elsewhere cannot help: we do not have the file
        for t in proof.tried(n):
            d = Path(os.path.dirname(t))
            if os.path.realpath(d) not in known and d not in new_dirs:
                new_dirs.append(d)
    new_dirs = plan.add_targets(new_dirs)
    plan.search.dirs += new_dirs
    plan.search.explain += [("observed after install", str(d), "the binary searched here too: "
                             "installing here as well") for d in new_dirs]
    return more, new_dirs


def _rounds(plan: _Plan, names: list[str], *, prove: bool, dry_run: bool, timeout: float,
            max_rounds: int) -> tuple[list[FileRow], ProbeRun | None]:
    rows: list[FileRow] = []
    proof: ProbeRun | None = None
    for _round in range(max_rounds):
        rows += _put_names(plan, names, dry_run)
        if dry_run or not prove:
            break
        proof = run_probe(plan.qemu, timeout=timeout)
        more, new_dirs = _learn(plan, proof)
        if new_dirs:
            plan.done.clear()     # every file again, into the new directories too
            continue
        if not more:
            break
        names += more
    return rows, proof


def install_bios(settings: Settings, recipe: Recipe | str, builder: str, *,
                 prefix: str | None = None,
                 destdir: str | None = None, qemu: str | Path | None = None,
                 firmware_from: Iterable[str | Path] = (), prove: bool = True,
                 dry_run: bool = False, timeout: float = 20, max_rounds: int = 6) -> BiosResult:
    """Install bios.bin, vapic.bin and the recipe's option ROMs into every directory the binary
    searches (plus recipe.install.firmware_compat_dirs), then prove it starts.

    firmware_from: extra directories to take files from that the binary asks for but the build
    does not provide (e.g. /usr/share/seabios for a distribution qemu that wants bios-256k.bin).
    """
    recipe = recipe_of(settings, recipe)
    builder = builder or settings.builder
    extra_dirs = [Path(d) for d in firmware_from]
    warnings: list[str] = []
    sources, recipe_names, bm = _build_sources(
        settings, recipe, builder, qemu is not None and bool(extra_dirs or dry_run), warnings)
    if bm is None:
        warnings.append(f"no build of {recipe.name}/{builder}: only files from "
                        f"{', '.join(map(str, extra_dirs))} can be installed")
    for d in extra_dirs:
        if not d.is_dir():
            raise InstallError(f"--firmware-from {d}: not a directory")
    qpath, t, mpath, m = _which_binary(settings, recipe, qemu, prefix, destdir)
    search = find_search_dirs(qpath, datadir_hint=bm.datadir if bm else None, timeout=timeout,
                              share_suffix=recipe.install.get("datadir") or "share/qemu")
    compat = [t.path(c) for c in recipe.install.get("firmware_compat_dirs") or []]
    plan = _Plan(qpath, t, mpath, m, search, sources, extra_dirs, recipe_names, compat, warnings)
    plan.add_targets([*search.dirs, *compat])
    asked = search.probe.missing_fatal + search.probe.missing_warn if search.probe else []
    names = list(dict.fromkeys(recipe_names + [n for n in asked if plan.source_for(n)]))
    rows, proof = _rounds(plan, names, prove=prove, dry_run=dry_run, timeout=timeout,
                          max_rounds=max_rounds)
    if not dry_run and m.bios != plan.bios_record() and (m.files or mpath.exists()):
        m.bios = plan.bios_record()
        save_manifest(mpath, m)
    # a path planned twice (after a newly observed directory) is reported once, by what happened
    by_path: dict[str, FileRow] = {}
    for r in rows:
        if r.path not in by_path or by_path[r.path].status == "already correct":
            by_path[r.path] = r
    rows = list(by_path.values()) + list(plan.missing.values())
    noop = all(r.status == "already correct" for r in rows if r.source != "(no source)")
    return BiosResult(qpath, search, rows, noop, proof, None if dry_run else mpath, warnings)


def explain_failure(proof: ProbeRun) -> str:
    """One paragraph: what the binary said and the exact paths it tried."""
    lines = []
    msg = [ln for ln in proof.stderr.splitlines() if ln.strip()]
    if msg:
        lines.append("it said: " + " | ".join(msg[-4:]))
    names = proof.missing_fatal or [n for n in ("bios.bin", "bios-256k.bin") if proof.tried(n)]
    for n in names:
        tried = proof.tried(n)
        if tried:
            lines.append(f"it tried for {n}: " + ", ".join(tried))
        elif proof.strace:
            lines.append(f"it did not try to open {n} anywhere")
    if not proof.strace:
        lines.append("(install strace to see every path it tries)")
    if proof.exit_code is None and not proof.started:
        lines.append("it neither answered on its monitor nor exited in time (killed)")
    elif not proof.started:
        lines.append(f"exit status {proof.exit_code}")
    return "; ".join(lines)
