"""unpack: a verified tarball (or a --source directory) into a new source tree.

Extraction refuses absolute member names, '..' components, links that point outside the tree and
device files (tarfile's "data" filter where Python has it, the same checks by hand otherwise), and
strips the top directory (recipe.source.strip_components). kvmlab.pipeline extracts into a temp
dir next to <work>/<recipe>/src, patches there and renames the result into place, so a failure
never leaves a half tree.
"""
from __future__ import annotations

import copy
import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from .errors import UnpackError

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


def extract(path: Path, kind: str, tree: Path, strip: int = 1) -> None:
    """Create the new directory tree from a tarball (kind "tarball") or as a copy of a directory.

    Callers extract into a temp dir next to the final place and rename it there when done."""
    if kind != "dir":
        from .srpm import is_srpm, unpack_srpm
        if is_srpm(path):  # source format "srpm": Source0 + the spec's %prep patches
            unpack_srpm(path, tree)
            return None
        return extract_tar(path, tree, strip)
    try:
        shutil.copytree(path, tree, symlinks=True)
    except (OSError, shutil.Error) as e:
        raise UnpackError(f"cannot copy source directory {path}: {e}") from None
