"""tar: extract a verified tarball safely; check an archive or tree before it is used.

Extraction refuses absolute member names, '..' components, links that point outside the tree and
device files (tarfile's "data" filter where Python has it, the same checks by hand otherwise), and
strips the top directory (recipe.source.strip_components). kvmlab.source.prepare extracts into a
temp dir next to <work>/<recipe>/src, patches there and renames the result into place, so a failure
never leaves a half tree.

check_archive / check_tree decide, before fetch locks or caches anything, whether a file is an
archive kvmlab.source.unpack.extract can unpack (tar, tar.gz/.bz2/.xz, .src.rpm) holding files
of the recipe's tree, and whether a directory looks like that tree (tree_markers: rules taken
from the recipe).
"""
from __future__ import annotations

import copy
import lzma
import os
import stat
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

from kvmlab.core.errors import UnpackError
from kvmlab.source.srpm import LEAD_MAGIC, is_srpm, read_rpm

_DATA_FILTER = getattr(tarfile, "data_filter", None)  # Python >= 3.11.4 (Debian 12 has 3.11.2)


class _Refused(Exception):
    pass


_REFUSALS = (_Refused, tarfile.FilterError) if _DATA_FILTER else (_Refused,)


def _unsafe(name: str) -> bool:
    return name.startswith("/") or ".." in PurePosixPath(name).parts


def _check_by_hand(m: tarfile.TarInfo) -> None:
    """The data filter's refusals, for Pythons without it."""
    if not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
        raise _Refused(f"{m.name!r} is a special file")
    if m.issym():
        target = os.path.normpath(os.path.join(os.path.dirname(m.name), m.linkname))
        if m.linkname.startswith("/") or target == ".." or target.startswith("../"):
            raise _Refused(f"{m.name!r} is a link to {m.linkname!r}, outside the tree")
    m.mode &= 0o755  # no setuid/setgid/sticky, no group/other write
    m.uid, m.gid, m.uname, m.gname = os.getuid(), os.getgid(), "", ""  # owned by us, as root too


def extract_tar(archive: Path, dest: Path, strip: int = 1) -> None:
    """Extract archive into the new directory dest, dropping `strip` leading path components."""
    def safe(m: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
        for name in (m.name, m.linkname if m.islnk() else ""):
            if _unsafe(name):
                raise UnpackError(f"{archive.name}: refusing member {name!r} "
                                  "(absolute path or '..')",
                                  hint="the archive would write outside the work dir; "
                                       "get the source from a trusted place")
        parts = PurePosixPath(m.name).parts
        if len(parts) <= strip:
            return None
        original, m = m.name, copy.copy(m)
        m.name = "/".join(parts[strip:])
        if m.islnk():
            m.linkname = "/".join(PurePosixPath(m.linkname).parts[strip:])
        try:
            if _DATA_FILTER:
                return _DATA_FILTER(m, path)
            _check_by_hand(m)
            return m
        except _REFUSALS as e:
            raise UnpackError(f"{archive.name}: refusing member {original!r}: {e}",
                              hint="the archive would write outside the work dir or create "
                                   "special files; get the source from a trusted place") from None

    dest.mkdir(parents=True)
    try:
        with tarfile.open(archive, "r:*") as tf:
            tf.errorlevel = 2
            if _DATA_FILTER:
                tf.extractall(dest, filter=safe)
            else:
                members = [x for x in (safe(m, str(dest)) for m in tf.getmembers()) if x]
                tf.extractall(dest, members=members)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UnpackError(f"cannot unpack {archive}: {e}",
                          hint="the cached file may be damaged: `invoke fetch --force`") from None
    if not any(dest.iterdir()):
        raise UnpackError(f"{archive.name}: nothing left after stripping {strip} leading "
                          "path component(s)", hint="check source.strip_components in the recipe")


# -- validation of local sources and first downloads (before anything is locked) ----------------

ARCHIVES = "tar, tar.gz, tar.bz2, tar.xz or .src.rpm"
Markers = list[tuple[tuple[str, ...], str]]  # [(alternatives, the recipe key the rule is from)]
_MAKEFILES = ("GNUmakefile", "makefile", "Makefile")


def tree_markers(recipe: Any) -> Markers:
    """What the top of a source tree of this recipe must hold, from the recipe's own data:
    [(alternatives, where the rule comes from)], one of the alternatives must exist.

    - qemu recipes: the configure program build.configure runs from the tree (./configure), and
      a Makefile when build.make runs make;
    - kmod recipes: the kmod.dirs the modules are built from (arch/x86/kvm, virt/kvm)."""
    out: Markers = []
    if recipe.kind == "qemu":
        conf = list(recipe.build.get("configure") or [])
        if conf and conf[0].startswith("./") and len(conf[0]) > 2:
            out.append(((conf[0][2:],), "build.configure"))
        make = list(recipe.build.get("make") or [])
        if make and PurePosixPath(make[0]).name in ("make", "gmake"):
            out.append((_MAKEFILES, "build.make"))
    kmod = recipe.raw.get("kmod") if isinstance(recipe.raw.get("kmod"), dict) else {}
    for d in kmod.get("dirs") or []:
        if isinstance(d, str) and d.strip("/"):
            out.append(((d.strip("/"),), "kmod.dirs"))
    return out


def _missing(markers: Markers, present: Any) -> Markers:
    return [(alts, why) for alts, why in markers if not any(present(a) for a in alts)]


def _shape_error(what: str, recipe: Any, missing: Markers, extra_hint: str = "") -> UnpackError:
    names = ", ".join(alts[-1] for alts, _ in missing)
    rules = sorted({why for _, why in missing})
    return UnpackError(
        f"{what} does not look like a source tree of {recipe.name}: no {names} at its top",
        hint=f"the recipe's {' and '.join(rules)} need{'s' if len(rules) == 1 else ''} "
             f"{names}; " + (extra_hint or
             "give the top directory of the unpacked sources, or their tarball"))


def check_tree(path: Path, recipe: Any, name: str | None = None) -> None:
    """UnpackError unless directory path is readable, not empty and has tree_markers(recipe).
    Messages start with name (default: the path)."""
    label = name or str(path)
    try:
        entries = os.listdir(path)
    except OSError as e:
        raise UnpackError(f"{label}: cannot read the directory: "
                          f"{(e.strerror or str(e)).lower()}",
                          hint="check its permissions") from None
    if not entries:
        raise UnpackError(f"{label} is an empty directory",
                          hint="give the directory holding the unpacked sources, or a tarball")
    markers = tree_markers(recipe)
    missing = _missing(markers, lambda rel: os.path.lexists(path / rel))
    if not missing:
        return
    inner = [d for d in sorted(entries) if (path / d).is_dir() and
             not _missing(markers, lambda rel, d=d: os.path.lexists(path / d / rel))]
    raise _shape_error(label, recipe, missing,
                       f"did you mean {path / inner[0]}?" if len(inner) == 1 else "")


def check_archive(path: Path, recipe: Any, name: str | None = None) -> str:
    """"srpm" or "tar" when path is an archive kvmlab.source.unpack.extract can unpack with files
    of the recipe's tree (after source.strip_components); else UnpackError naming the problem.
    Reads the whole archive (a damaged or truncated one is refused). Messages start with name
    (default: the file name)."""
    label = name or path.name
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise UnpackError(f"{label}: cannot read it: {(e.strerror or str(e)).lower()}",
                          hint="check its permissions") from None
    if not stat.S_ISREG(st.st_mode):
        raise UnpackError(f"{label} is not a regular file", hint=f"give a {ARCHIVES} file")
    if st.st_size == 0:
        raise UnpackError(f"{label} is an empty file (0 bytes)",
                          hint="an interrupted download or copy? get a complete copy")
    if is_srpm(path):
        _check_srpm(path, label)
        return "srpm"
    if head == LEAD_MAGIC:
        raise UnpackError(f"{label} is a binary RPM, not a source RPM",
                          hint="give the .src.rpm (or a tarball of the sources)")
    strip = recipe.source.strip_components
    files, kept, names = _scan_tar(path, label, strip, st.st_size)
    if not kept:
        raise UnpackError(f"{label} is an archive with no files" if not files else
                          f"{label}: no files left after stripping {strip} leading path "
                          "component(s) (source.strip_components)",
                          hint="not the recipe's source archive?")
    missing = _missing(tree_markers(recipe), lambda rel: rel in names)
    if missing:
        raise _shape_error(label, recipe, missing,
                           f"its members, after stripping {strip} leading path component(s) "
                           "(source.strip_components), must include them")
    return "tar"


def _check_srpm(path: Path, label: str) -> None:
    info = read_rpm(path)  # SrpmError (an UnpackError) when the RPM is damaged
    files = info.tags.get(1117)  # RPMTAG_BASENAMES
    if isinstance(files, list) and not files:
        raise UnpackError(f"{label} is a source RPM with no files in it")
    if isinstance(files, list) and not any(f.endswith(".spec") for f in files):
        raise UnpackError(f"{label} is a source RPM without a .spec file",
                          hint="kvmlab reproduces the spec's %prep; give a complete .src.rpm")


def _scan_tar(path: Path, label: str, strip: int, size: int) -> tuple[int, int, set[str]]:
    """Read the whole tar archive: (regular files, regular files kept after strip, the kept
    paths and their parent directories). UnpackError when it is unsafe, damaged or no tar."""
    files, kept, names = 0, 0, set()
    try:
        tf = tarfile.open(path, "r:*")  # noqa: SIM115 - closed below; open errors differ
    except (tarfile.TarError, EOFError, OSError):
        raise UnpackError(f"{label} is not an archive kvmlab can unpack "
                          f"({size} bytes; {ARCHIVES} expected)",
                          hint="an HTML error page saved as the file? check what it is "
                               f"(`file {label}`)") from None
    try:
        with tf:
            for m in tf:
                if _unsafe(m.name) or (m.islnk() and _unsafe(m.linkname)):
                    raise UnpackError(f"{label}: refusing member {m.name!r} (absolute path or "
                                      "'..')", hint="the archive would write outside the work "
                                                    "dir; get the source from a trusted place")
                files += m.isreg()
                parts = PurePosixPath(m.name).parts[strip:]
                if not parts:
                    continue
                kept += m.isreg()
                for i in range(1, len(parts) + 1):
                    names.add("/".join(parts[:i]))
    except UnpackError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError) as e:
        raise UnpackError(f"{label} is a damaged or truncated archive: {e}",
                          hint="get a complete copy (a download cut short?)") from None
    return files, kept, names
