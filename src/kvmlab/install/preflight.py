"""Before an install writes anything: every destination checked (in the way, writable, space),
and the one phrasing of what went wrong while writing.

``preflight`` refuses with "nothing was installed" before the first write; ``os_error`` turns an
OSError during the write into the message that says everything was rolled back.
"""
from __future__ import annotations

import errno
import os
import pwd
import stat
from collections.abc import Iterable
from pathlib import Path

from kvmlab.core import proc
from kvmlab.core.errors import InstallError, KvmlabError


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _nearest_existing(path: Path) -> Path:
    p = path
    while not os.path.lexists(p):
        if p.parent == p:
            break
        p = p.parent
    return p


def why_unwritable(d: Path) -> str:
    try:
        if os.statvfs(d).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError:
        pass
    try:
        out = proc.run(["lsattr", "-d", str(d)], timeout=5)
        if out.returncode == 0 and "i" in out.stdout.split()[0]:
            return "immutable attribute (chattr +i)"
    except (KvmlabError, IndexError):
        pass
    try:
        owner = pwd.getpwuid(d.stat().st_uid).pw_name
    except (OSError, KeyError):
        owner = "?"
    return f"owned by {owner}, mode {stat.filemode(d.stat().st_mode) if d.exists() else '?'}"


def _free_bytes(d: Path) -> int | None:
    """Bytes this user may still write on d's file system (None: unknown)."""
    try:
        sv = os.statvfs(d)
    except OSError:
        return None
    return (sv.f_bfree if os.geteuid() == 0 else sv.f_bavail) * sv.f_frsize


def _check_dirs(dirs_needed: Iterable[Path]) -> None:
    for d in dirs_needed:
        base = _nearest_existing(d)
        if base != d and not base.is_dir():
            raise InstallError(f"a file is in the way: {base} is not a directory "
                               f"(needed for {d})",
                               hint=f"remove or rename {base}, or choose another --prefix")
        if base == d and not d.is_dir():
            raise InstallError(f"a file is in the way: {d} is not a directory",
                               hint=f"remove or rename {d}, or choose another --prefix")


def _unwritable_error(unwritable: dict[Path, Path], what: str) -> InstallError:
    d = next(iter(unwritable))
    more = f" (and {len(unwritable) - 1} more)" if len(unwritable) > 1 else ""
    reason = why_unwritable(d)
    if os.geteuid() != 0:
        return InstallError(f"cannot write to {d}{more}: {reason}; nothing was {what}ed",
                            hint="run it with sudo, or choose a prefix you own "
                                 "(--prefix ~/.local)")
    return InstallError(f"cannot write to {d}{more} even as root: {reason}; nothing was "
                        f"{what}ed", hint="choose another --prefix/--destdir or make it writable")


def preflight(files: list[tuple[Path, int]], dirs_needed: Iterable[Path],
              what: str = "install") -> None:
    """Check every destination before writing anything.

    files: (destination, bytes to write). Raises InstallError for a directory in the way, a
    file in the way of a directory, an unwritable directory or too little space.
    """
    _check_dirs(dirs_needed)
    unwritable: dict[Path, Path] = {}
    need: dict[int, int] = {}
    dev_dir: dict[int, Path] = {}
    for dest, size in files:
        if os.path.isdir(dest) and not os.path.islink(dest):
            raise InstallError(f"a directory is in the way: {dest} (a file goes there)",
                               hint=f"remove or rename the directory {dest}")
        base = _nearest_existing(dest.parent)
        if not base.is_dir():
            raise InstallError(f"a file is in the way: {base} is not a directory "
                               f"(needed for {dest})",
                               hint=f"remove or rename {base}, or choose another --prefix")
        if not os.access(base, os.W_OK | os.X_OK):
            unwritable.setdefault(base, dest)
        try:
            dev = os.stat(base).st_dev
        except OSError:
            continue
        need[dev] = need.get(dev, 0) + size + 4096
        dev_dir.setdefault(dev, base)
    if unwritable:
        raise _unwritable_error(unwritable, what)
    for dev, n in need.items():
        free = _free_bytes(dev_dir[dev])
        if free is not None and n > free:
            raise InstallError(f"not enough space on {dev_dir[dev]}: {what} needs "
                               f"{_human(n)}, {_human(free)} free; nothing was {what}ed",
                               hint="free some space or choose another --prefix/--destdir")


def os_error(e: OSError, path: Path | str, what: str) -> InstallError:
    if e.errno == errno.ENOSPC:
        return InstallError(f"disk full while writing {path}; rolled back everything this "
                            f"{what} had written", hint="free some space or choose another "
                                                        "--prefix/--destdir")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return InstallError(f"cannot write {path}: {e.strerror}; rolled back everything this "
                            f"{what} had written",
                            hint="run it with sudo, or choose a prefix you own (--prefix)")
    if e.errno == errno.EISDIR:
        return InstallError(f"a directory is in the way: {path}; rolled back",
                            hint=f"remove or rename the directory {path}")
    return InstallError(f"{what} failed at {path}: {e.strerror or e}; rolled back everything "
                        f"this {what} had written")
