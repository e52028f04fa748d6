"""install, install-bios and uninstall: put the built binaries and their firmware where the
binary really looks, record every file written, and undo it exactly.

Input: the build output ``settings.out(recipe, builder)`` (bin/, pc-bios/, manifest.json, made
by kvmlab.build.qemu).

Install manifest: one JSON file per DESTDIR+PREFIX pair, at
``<state_dir>/installs/<slug>-<hash12>.json`` where hash12 = sha256("<destdir>\\0<prefix>")[:12]
and slug is the prefix with "/" turned into "_" (readable only). It lists every file kvmlab wrote
(path, sha256, mode, uid/gid, which step wrote it, what it replaced and where the backup is) and
every directory it created; ``uninstall`` walks it backwards. install and install-bios for the
same DESTDIR+PREFIX share one manifest.

Backups: an existing file that differs is hard-linked (same inode, owner, mode) to
``<file>.kvmlab-bak`` (``.kvmlab-bak.N`` when taken) next to it before the new file is renamed
over it; uninstall renames the backup back, which restores the exact previous file.

Writes: every destination is checked first (directories in the way, writability of the nearest
existing ancestor, free space); then each file is written to a temp file in the same directory and
renamed into place. Any error (ENOSPC included) rolls back everything this run wrote.

Firmware lookup (install-bios): qemu-kvm 0.12 searches exactly one directory: ``-L DIR``; else
``realpath(exe)/../../share/qemu`` if it exists, else ``.../pc-bios``; else the compiled-in
CONFIG_QEMU_SHAREDIR (manifest config.datadir). Newer qemu (e.g. Debian's 7.2) searches a list
that ``-L help`` prints. In both cases the binary is also run briefly (paused with -S, monitor on a
unix socket, under strace when present) to observe the paths it really tries.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmlab.core.errors import InstallError
from kvmlab.core.fsutil import atomic_write_json, sha256_file
from kvmlab.core.proc import kill_group
from kvmlab.core.settings import Settings
from kvmlab.model.recipe import Recipe, load_recipe

MODES = ("copy", "symlink", "make-install")
BACKUP_SUFFIX = ".kvmlab-bak"
QEMU_NAME = "qemu-system-x86_64"
FIRMWARE_RE = re.compile(r"\.(bin|rom|img|fd|aml)$")
# names a qemu binary asks for in its data dirs (the BIOS is what decides where it searches)
BIOS_RE = re.compile(r"^bios(-256k)?\.bin$")


# ---------------------------------------------------------------------------------------------
# results
@dataclass
class FileRow:
    path: str
    source: str
    sha256: str
    status: str        # installed / already correct / replaced, backup at ... / would ... / missing
    backup: str | None = None
    name: str = ""


@dataclass
class InstallResult:
    prefix: str
    destdir: str
    root: Path                  # DESTDIR + PREFIX
    mode: str
    manifest_path: Path
    rows: list[FileRow]
    noop: bool
    warnings: list[str] = field(default_factory=list)
    deps_installed: list[str] = field(default_factory=list)  # Debian packages --install-deps added


@dataclass
class ProbeRun:
    """One short, paused start of a qemu binary."""
    qemu: Path
    argv: list[str]
    started: bool               # alive and the monitor answered
    exit_code: int | None
    stderr: str
    monitor_banner: str
    attempts: list[tuple[str, bool]]   # (absolute path, found?) for firmware-like files
    missing_fatal: list[str]           # file names whose absence stopped it
    missing_warn: list[str]            # file names it warned about
    loaded: dict[str, str]             # file name -> path it opened
    strace: bool
    reported_dirs: list[tuple[str, str]] = field(default_factory=list)  # debug-bios-path lines

    @property
    def ok(self) -> bool:
        return self.started

    def tried(self, name: str) -> list[str]:
        return [p for p, _ in self.attempts if os.path.basename(p) == name]


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


@dataclass
class UninstallResult:
    manifest_path: Path
    removed: list[str]
    restored: list[str]
    skipped: list[tuple[str, str]]
    dirs_removed: list[str]
    kept_backups: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# small helpers
def _recipe(settings: Settings, recipe: Recipe | str | None) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    return load_recipe(settings.recipes_dir, recipe or settings.recipe)


def _join(destdir: str, path: str | Path) -> Path:
    """DESTDIR + an absolute path (like make's $(DESTDIR)$(prefix))."""
    p = str(path)
    if not destdir:
        return Path(p)
    return Path(os.path.normpath(destdir + "/" + p.lstrip("/")))


def _norm_prefix(prefix: str | Path) -> str:
    p = os.path.normpath(os.path.expanduser(str(prefix)))
    if not os.path.isabs(p):
        p = os.path.abspath(p)
    return p


def _norm_destdir(destdir: str | Path | None) -> str:
    if not destdir:
        return ""
    return os.path.abspath(os.path.expanduser(str(destdir)))


def manifest_path(settings: Settings, destdir: str | None, prefix: str) -> Path:
    destdir = _norm_destdir(destdir)
    prefix = _norm_prefix(prefix)
    h = hashlib.sha256(f"{destdir}\0{prefix}".encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", (destdir + prefix).strip("/"))[-60:] or "root"
    return settings.state_dir / "installs" / f"{slug}-{h}.json"


def _load_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise InstallError(f"install manifest {path} is unreadable: {e}",
                           hint="move it away to start over (files it lists stay installed)")


def _unlink_quiet(p: str | Path) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def load_build(settings: Settings, recipe: Recipe, builder: str) -> tuple[Path, dict[str, Any]]:
    """The build output dir and its manifest.json, or InstallError with the hint to build."""
    out = settings.out(recipe.name, builder)
    mf = out / "manifest.json"
    if not mf.is_file():
        raise InstallError(f"no build artifacts for {recipe.name}/{builder} (no {mf})",
                           hint=f"run `invoke build --recipe {recipe.name} --builder {builder}` "
                                "first")
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, ValueError) as e:
        raise InstallError(f"build manifest {mf} is unreadable: {e}",
                           hint=f"rebuild: `invoke build --recipe {recipe.name} "
                                f"--builder {builder} --force`") from None
    for a in manifest.get("artifacts", []):
        p = out / a["path"]
        if not p.is_file():
            raise InstallError(f"build output incomplete: {p} is listed in {mf} but missing",
                               hint=f"rebuild: `invoke build --recipe {recipe.name} "
                                    f"--builder {builder} --force`")
    return out, manifest


# ---------------------------------------------------------------------------------------------
# pre-flight checks
def _nearest_existing(path: Path) -> Path:
    p = path
    while not os.path.lexists(p):
        if p.parent == p:
            break
        p = p.parent
    return p


def _why_unwritable(d: Path) -> str:
    try:
        if os.statvfs(d).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError:
        pass
    try:
        out = subprocess.run(["lsattr", "-d", str(d)], capture_output=True, text=True, timeout=5)
        if out.returncode == 0 and "i" in out.stdout.split()[0]:
            return "immutable attribute (chattr +i)"
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    try:
        st = d.stat()
        import pwd
        owner = pwd.getpwuid(st.st_uid).pw_name
    except (OSError, KeyError):
        owner = "?"
    return f"owned by {owner}, mode {stat.filemode(d.stat().st_mode) if d.exists() else '?'}"


def _preflight(files: list[tuple[Path, int]], dirs_needed: Iterable[Path],
               what: str = "install") -> None:
    """Check every destination before writing anything.

    files: (destination, bytes to write). Raises InstallError for a directory in the way, a
    file in the way of a directory, an unwritable directory or too little space.
    """
    unwritable: dict[Path, Path] = {}
    need: dict[int, int] = {}
    dev_dir: dict[int, Path] = {}
    for d in dirs_needed:
        base = _nearest_existing(d)
        if base != d and not base.is_dir():
            raise InstallError(f"a file is in the way: {base} is not a directory "
                               f"(needed for {d})",
                               hint=f"remove or rename {base}, or choose another --prefix")
        if base == d and not d.is_dir():
            raise InstallError(f"a file is in the way: {d} is not a directory",
                               hint=f"remove or rename {d}, or choose another --prefix")
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
        d, dest = next(iter(unwritable.items()))
        more = f" (and {len(unwritable) - 1} more)" if len(unwritable) > 1 else ""
        reason = _why_unwritable(d)
        if os.geteuid() != 0:
            raise InstallError(f"cannot write to {d}{more}: {reason}; nothing was {what}ed",
                               hint="run it with sudo, or choose a prefix you own "
                                    "(--prefix ~/.local)")
        raise InstallError(f"cannot write to {d}{more} even as root: {reason}; nothing was "
                           f"{what}ed", hint="choose another --prefix/--destdir or make it "
                                             "writable")
    for dev, n in need.items():
        free = _free_bytes(dev_dir[dev])
        if free is not None and n > free:
            raise InstallError(f"not enough space on {dev_dir[dev]}: {what} needs "
                               f"{_human(n)}, {_human(free)} free; nothing was {what}ed",
                               hint="free some space or choose another --prefix/--destdir")


def _free_bytes(d: Path) -> int | None:
    """Bytes this user may still write on d's file system (None: unknown)."""
    try:
        sv = os.statvfs(d)
    except OSError:
        return None
    return (sv.f_bfree if os.geteuid() == 0 else sv.f_bavail) * sv.f_frsize


def _os_error(e: OSError, path: Path | str, what: str) -> InstallError:
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


# ---------------------------------------------------------------------------------------------
# the transaction: atomic writes, backups, rollback
def _copy_data(src, dst) -> None:  # noqa: ANN001 - file objects; tests may monkeypatch this
    shutil.copyfileobj(src, dst, 1 << 20)


def _free_backup_name(path: Path) -> Path:
    b = path.with_name(path.name + BACKUP_SUFFIX)
    n = 1
    while os.path.lexists(b):
        b = path.with_name(f"{path.name}{BACKUP_SUFFIX}.{n}")
        n += 1
    return b


def _describe_existing(path: Path) -> dict[str, Any] | None:
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISLNK(st.st_mode):
        return {"type": "symlink", "target": os.readlink(path)}
    return {"type": "file", "sha256": sha256_file(path), "mode": f"{stat.S_IMODE(st.st_mode):04o}",
            "uid": st.st_uid, "gid": st.st_gid}


class _Txn:
    """Journal of what this run changed, so any error rolls it all back."""

    def __init__(self, what: str):
        self.what = what
        self.journal: list[tuple[str, Path, Path | None]] = []
        self.temporary: list[Path] = []   # backups of our own older files, dropped on commit

    def commit(self) -> None:
        for p in self.temporary:
            _unlink_quiet(p)
        self.journal.clear()
        self.temporary.clear()

    def mkdirs(self, d: Path) -> list[Path]:
        made: list[Path] = []
        missing = []
        p = d
        while not os.path.lexists(p):
            missing.append(p)
            p = p.parent
        for m in reversed(missing):
            try:
                os.mkdir(m, 0o755)
            except OSError as e:
                raise _os_error(e, m, self.what) from None
            self.journal.append(("dir", m, None))
            made.append(m)
        return made

    def _backup(self, dest: Path) -> Path:
        backup = _free_backup_name(dest)
        try:
            os.link(dest, backup, follow_symlinks=False)
        except OSError:
            shutil.copy2(dest, backup, follow_symlinks=False)
            st = os.lstat(dest)
            os.chown(backup, st.st_uid, st.st_gid, follow_symlinks=False)
        self.journal.append(("backup", backup, dest))
        return backup

    def put_file(self, dest: Path, src: Path, mode: int, backup: bool) -> Path | None:
        """Copy src to dest atomically; back up an existing dest first when asked."""
        bpath = None
        fd, tmp = -1, ""
        try:
            if os.path.lexists(dest) and backup:
                bpath = self._backup(dest)
            existed = os.path.lexists(dest)
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".kvmlab-tmp",
                                       dir=dest.parent)
            out = os.fdopen(fd, "wb")
            fd = -1                       # owned by `out` now
            with out, open(src, "rb") as inp:
                _copy_data(inp, out)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, mode)
            self.journal.append(("tmp", Path(tmp), None))
            os.replace(tmp, dest)
            self.journal[-1] = ("replaced" if existed else "created", dest, bpath)
        except BaseException as e:
            if fd >= 0:
                os.close(fd)
            if tmp and os.path.lexists(tmp):
                _unlink_quiet(tmp)
            if isinstance(e, OSError):
                raise _os_error(e, dest, self.what) from None
            raise
        return bpath

    def put_symlink(self, dest: Path, target: Path, backup: bool) -> Path | None:
        bpath = None
        try:
            if os.path.lexists(dest) and backup:
                bpath = self._backup(dest)
            existed = os.path.lexists(dest)
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.kvmlab-tmp")
            _unlink_quiet(tmp)
            os.symlink(target, tmp)
            self.journal.append(("tmp", tmp, None))
            os.replace(tmp, dest)
            self.journal[-1] = ("replaced" if existed else "created", dest, bpath)
        except OSError as e:
            _unlink_quiet(dest.with_name(f".{dest.name}.{os.getpid()}.kvmlab-tmp"))
            raise _os_error(e, dest, self.what) from None
        return bpath

    def rollback(self) -> None:
        for kind, path, extra in reversed(self.journal):
            try:
                if kind in ("created", "tmp"):
                    _unlink_quiet(path)
                elif kind == "replaced":
                    if extra is not None:
                        os.replace(extra, path)
                elif kind == "backup":
                    # still present only if "replaced" did not happen (or was undone above)
                    if os.path.lexists(path) and extra is not None and os.path.lexists(extra):
                        _unlink_quiet(path)
                elif kind == "dir":
                    try:
                        os.rmdir(path)
                    except OSError:
                        pass
            except OSError:
                pass
        self.journal.clear()


# ---------------------------------------------------------------------------------------------
# manifests of installed files
def _new_manifest(destdir: str, prefix: str) -> dict[str, Any]:
    return {"schema": 1, "destdir": destdir, "prefix": prefix,
            "root": str(_join(destdir, prefix)), "files": [], "dirs_created": [],
            "installs": [], "bios": None}


def _entry_for(m: dict[str, Any], path: Path) -> dict[str, Any] | None:
    for e in m["files"]:
        if e["path"] == str(path):
            return e
    return None


def _owned_and_intact(m: dict[str, Any] | None, dest: Path) -> dict[str, Any] | None:
    """The manifest entry for dest if dest still holds what kvmlab wrote there."""
    if not m:
        return None
    e = _entry_for(m, dest)
    if not e:
        return None
    cur = _describe_existing(dest)
    if cur is None:
        return None
    if e.get("type") == "symlink":
        return e if cur["type"] == "symlink" and cur["target"] == e.get("target") else None
    return e if cur["type"] == "file" and cur["sha256"] == e["sha256"] else None


@dataclass
class _Item:
    dest: Path
    src: Path | None            # None for symlinks
    sha256: str
    mode: int
    kind: str
    name: str
    link_target: Path | None = None


def _apply(items: list[_Item], m: dict[str, Any], step: str, what: str,
           dry_run: bool = False) -> list[FileRow]:
    """Plan, check and write items as one transaction; update manifest m in memory."""
    rows: list[FileRow] = []
    todo: list[tuple[_Item, dict[str, Any] | None, dict[str, Any] | None]] = []
    for it in items:
        cur = None if os.path.isdir(it.dest) and not os.path.islink(it.dest) \
            else _describe_existing(it.dest)
        if os.path.isdir(it.dest) and not os.path.islink(it.dest):
            todo.append((it, None, None))
            continue
        if cur is not None:
            same = (cur["type"] == "symlink" and it.link_target is not None and
                    cur["target"] == str(it.link_target)) or \
                   (cur["type"] == "file" and it.link_target is None and
                    cur["sha256"] == it.sha256 and cur["mode"] == f"{it.mode:04o}")
            if same:
                rows.append(FileRow(str(it.dest), str(it.src or it.link_target), it.sha256,
                                    "already correct", name=it.name))
                continue
        todo.append((it, cur, _owned_and_intact(m, it.dest)))
    if dry_run:
        for it, cur, owned in todo:
            if os.path.isdir(it.dest) and not os.path.islink(it.dest):
                st = "blocked: a directory is in the way"
            elif cur is None:
                st = "would install"
            else:
                st = "would update" if owned else "would replace (backup first)"
            rows.append(FileRow(str(it.dest), str(it.src or it.link_target), it.sha256, st,
                                name=it.name))
        return rows
    if not todo:
        return rows
    dirs = {it.dest.parent for it, _, _ in todo}
    _preflight([(it.dest, os.path.getsize(it.src) if it.src else 0) for it, _, _ in todo],
               dirs, what)
    txn = _Txn(what)
    new_entries: list[dict[str, Any]] = []
    created_dirs: list[Path] = []
    try:
        for d in sorted(dirs, key=lambda p: len(p.parts)):
            created_dirs += txn.mkdirs(d)
        for it, cur, owned in todo:
            old = _entry_for(m, it.dest)
            need_backup = cur is not None and owned is None
            # an older file of ours is also linked aside, so a rollback can put it back; that
            # link is dropped on commit
            if it.link_target is not None:
                bpath = txn.put_symlink(it.dest, it.link_target, cur is not None)
            else:
                assert it.src is not None
                bpath = txn.put_file(it.dest, it.src, it.mode, cur is not None)
            if bpath is not None and not need_backup:
                txn.temporary.append(bpath)
                bpath = None
            st = os.lstat(it.dest)
            entry = {"path": str(it.dest), "name": it.name, "kind": it.kind, "step": step,
                     "type": "symlink" if it.link_target is not None else "file",
                     "sha256": it.sha256, "mode": f"{it.mode:04o}", "uid": st.st_uid,
                     "gid": st.st_gid, "source": str(it.src or it.link_target)}
            if it.link_target is not None:
                entry["target"] = str(it.link_target)
            if old is not None and owned is not None:
                entry["replaced"] = old.get("replaced")     # keep the pre-kvmlab original
            elif old is not None and need_backup:
                # changed behind our back since the last install: remember the newest original,
                # keep older backups recorded too
                entry["replaced"] = {**cur, "backup": str(bpath)} if cur else None
                entry["older_backups"] = [old.get("replaced")] if old.get("replaced") else []
            else:
                entry["replaced"] = {**cur, "backup": str(bpath)} if cur else None
            new_entries.append(entry)
            if cur is None:
                status = "installed"
            elif need_backup:
                status = f"replaced, backup at {bpath}"
            else:
                status = "updated"
            rows.append(FileRow(str(it.dest), str(it.src or it.link_target), it.sha256, status,
                                backup=str(bpath) if bpath else None, name=it.name))
    except BaseException:
        txn.rollback()
        raise
    # commit into the manifest (saved by the caller; if saving fails it calls rollback)
    for e in new_entries:
        old = _entry_for(m, Path(e["path"]))
        if old is not None:
            m["files"][m["files"].index(old)] = e
        else:
            m["files"].append(e)
    for d in created_dirs:
        if str(d) not in m["dirs_created"]:
            m["dirs_created"].append(str(d))
    m["_txn"] = txn
    return rows


def _save_manifest(path: Path, m: dict[str, Any]) -> None:
    txn = m.pop("_txn", None)
    m["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        atomic_write_json(path, m)
    except OSError as e:
        if txn is not None:
            txn.rollback()
        raise InstallError(f"cannot write the install manifest {path}: {e.strerror}; rolled back",
                           hint="check the state directory (KVMLAB_STATE_DIR)") from None
    if txn is not None:
        txn.commit()


# ---------------------------------------------------------------------------------------------
# runtime dependencies: the sonames the build recorded (build.RUNTIME_DEPS) against this host
APT_TIMEOUT = float(os.environ.get("KVMLAB_APT_TIMEOUT", "900"))
APT_INSTALL = ["apt-get", "install", "-y", "--no-install-recommends"]


def _loader_dirs() -> list[str]:
    """The directories the dynamic loader searches without ld.so.cache (Debian multiarch)."""
    m = platform.machine()
    return [f"/lib/{m}-linux-gnu", f"/usr/lib/{m}-linux-gnu", "/lib64", "/usr/lib64", "/lib",
            "/usr/lib"]


def parse_ldconfig(text: str, machine: str | None = None) -> set[str]:
    """Sonames in `ldconfig -p` output, for this machine's word size (x86-64 entries on
    x86_64: an i386 libfoo.so.1 does not satisfy a 64-bit binary)."""
    machine = machine or platform.machine()
    want = {"x86_64": "x86-64", "aarch64": "AArch64"}.get(machine)
    out = set()
    for line in text.splitlines():
        m = re.match(r"^\s+(\S+)\s+\(([^)]*)\)\s+=>\s+/", line)
        if m and (want is None or want in m.group(2)):
            out.add(m.group(1))
    return out


def host_sonames(wanted: Iterable[str]) -> set[str] | None:
    """Which of wanted the dynamic loader finds on this host: ld.so.cache (`ldconfig -p`) or a
    file in its default directories. None: no ldconfig here (cannot tell)."""
    ldconfig = next((p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig") if os.path.exists(p)),
                    None)
    if ldconfig is None:
        return None
    try:
        r = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    have = parse_ldconfig(r.stdout)
    found = set()
    for so in wanted:
        if so in have or any(os.path.exists(os.path.join(d, so)) for d in _loader_dirs()):
            found.add(so)
    return found


def missing_runtime_deps(bm: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The build's runtime_deps entries whose soname this host lacks; None when the build
    manifest records none (built by an older kvmlab) or the host cannot be asked."""
    deps = bm.get("runtime_deps")
    if not isinstance(deps, list):
        return None
    deps = [d for d in deps if isinstance(d, dict) and d.get("soname")]
    found = host_sonames(d["soname"] for d in deps)
    if found is None:
        return None
    return [d for d in deps if d["soname"] not in found]


def apt_command(packages: Iterable[str]) -> list[str]:
    return APT_INSTALL + sorted(set(packages))


def _apt_line(packages: Iterable[str]) -> str:
    return ("" if os.geteuid() == 0 else "sudo ") + " ".join(apt_command(packages))


def _describe_missing(missing: list[dict[str, Any]]) -> str:
    parts = []
    for d in missing:
        if d.get("runtime_package"):
            parts.append(f"{d['soname']} ({d['runtime_package']})")
        else:
            parts.append(f"{d['soname']} (no Debian package known; builder's: "
                         f"{d.get('builder_package') or 'none'})")
    return ", ".join(parts)


def _run_logged(cmd: list[str], log: Path, timeout: float) -> tuple[int, str]:
    """Run cmd, its output streamed to the terminal and appended to log; (exit code, last
    line). The whole process group is killed after timeout (exit code None -> -9)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    last = ""
    with open(log, "a", encoding="utf-8", errors="replace") as f:
        f.write("+ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, text=True, errors="replace",
                                 env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                                 start_new_session=True)
        except OSError as e:
            raise InstallError(f"cannot run {cmd[0]}: {e.strerror}",
                               hint="--install-deps needs apt-get (a Debian host)") from None
        timed_out = threading.Event()
        timer = threading.Timer(timeout, lambda: (timed_out.set(), kill_group(p)))
        timer.daemon = True
        timer.start()
        try:
            assert p.stdout is not None
            for line in p.stdout:
                f.write(line)
                f.flush()
                sys.stdout.write(line)
                sys.stdout.flush()
                if line.strip():
                    last = line.strip()
            rc = p.wait(timeout=60)
        finally:
            timer.cancel()
            kill_group(p)
    if timed_out.is_set():
        raise InstallError(f"`{' '.join(cmd)}` timed out after {timeout:.0f} s and was stopped",
                           hint=f"set KVMLAB_APT_TIMEOUT (seconds); its output: {log}")
    return rc, last


def _apt_install(settings: Settings, packages: list[str], timeout: float) -> None:
    if os.geteuid() != 0:
        raise InstallError("--install-deps runs apt-get, which needs root; nothing was "
                           "installed", hint=f"run `{_apt_line(packages)}` first, or run "
                                             "install with sudo")
    if shutil.which("apt-get") is None:
        raise InstallError("--install-deps needs apt-get, and this host has none; nothing was "
                           "installed", hint="install the packages that provide the missing "
                                             "libraries with this host's package manager")
    log = settings.work_dir / "install-deps.log"
    lists = Path("/var/lib/apt/lists")
    if not any(lists.glob("*_Packages*")):     # trimmed lists (minimal images): fetch them
        rc, last = _run_logged(["apt-get", "update"], log, timeout)
        if rc != 0:
            raise InstallError(f"`apt-get update` failed (exit {rc}): {last}; nothing was "
                               "installed", hint=f"check the apt sources; its output: {log}")
    cmd = apt_command(packages)
    rc, last = _run_logged(cmd, log, timeout)
    if rc != 0:
        raise InstallError(f"`{' '.join(cmd)}` failed (exit {rc}): {last}; nothing was "
                           "installed", hint=f"its output: {log}")


def ensure_runtime_deps(settings: Settings, recipe: Recipe, builder: str, bm: dict[str, Any], *,
                        install_deps: bool, dry_run: bool, warnings: list[str]) -> list[str]:
    """Check the build's runtime libraries on this host before anything is copied: refuse with
    the apt-get line, or (install_deps) install the packages. Returns the packages installed."""
    missing = missing_runtime_deps(bm)
    if missing is None:
        if not isinstance(bm.get("runtime_deps"), list):
            warnings.append(f"the build of {recipe.name}/{builder} records no runtime "
                            "dependencies (built by an older kvmlab): libraries not checked; "
                            f"`invoke build --recipe {recipe.name} --builder {builder} --force` "
                            "records them")
        else:
            warnings.append("no ldconfig on this host: runtime libraries not checked")
        return []
    if not missing:
        return []
    known = sorted({d["runtime_package"] for d in missing if d.get("runtime_package")})
    unknown = [d["soname"] for d in missing if not d.get("runtime_package")]
    n = len(missing)
    what = f"{n} shared librar{'y' if n == 1 else 'ies'}"
    if dry_run:
        warnings.append(f"this host lacks {what} the binaries need: {_describe_missing(missing)}"
                        + (f"; `{_apt_line(known)}` installs them" if known else ""))
        return []
    hint_parts = []
    if known:
        hint_parts.append(f"`{_apt_line(known)}`" + ("" if install_deps else
                                                       " (or run install with --install-deps)"))
    if unknown:
        hint_parts.append("find a package for " + ", ".join(unknown) + " with "
                          "`apt-file search SONAME`")
    if not install_deps or unknown:
        raise InstallError(f"this host lacks {what} that the build of {recipe.name}/{builder} "
                           f"needs: {_describe_missing(missing)}; nothing was installed",
                           hint="; ".join(hint_parts))
    _apt_install(settings, known, APT_TIMEOUT)
    still = missing_runtime_deps(bm) or []
    if still:
        raise InstallError(f"apt-get installed {', '.join(known)}, but this host still lacks "
                           f"{_describe_missing(still)}; nothing was installed",
                           hint=f"its output: {settings.work_dir / 'install-deps.log'}")
    return known


# ---------------------------------------------------------------------------------------------
# install
def binary_path(recipe: Recipe, root: Path, base: str = QEMU_NAME) -> Path:
    """Where binary `base` is installed under root (DESTDIR+PREFIX): bindir/<name>, or
    root/<name> when the recipe's binary_names value has a "/" (relative to the prefix, e.g.
    RHEL's libexec/qemu-kvm)."""
    name = (recipe.install.get("binary_names", {}) or {}).get(base, base)
    return root / name if "/" in name else root / (recipe.install.get("bindir") or "bin") / name


def _binary_items(recipe: Recipe, out: Path, manifest: dict[str, Any], root: Path,
                  mode: str) -> list[_Item]:
    items = []
    for a in manifest.get("artifacts", []):
        if a.get("kind") != "binary":
            continue
        src = out / a["path"]
        base = os.path.basename(a["path"])
        dest = binary_path(recipe, root, base)
        m = int(str(a.get("mode", "0755")), 8) if isinstance(a.get("mode"), str) else \
            int(a.get("mode") or 0o755)
        if mode == "symlink":
            items.append(_Item(dest, None, a["sha256"], m, "binary", base,
                               link_target=src.resolve()))
        else:
            items.append(_Item(dest, src, a["sha256"], m, "binary", base))
    return items


def install(settings: Settings, recipe: Recipe | str, builder: str, *,
            prefix: str | None = None,
            destdir: str | None = None, mode: str = "copy", dry_run: bool = False,
            timeout: float = 900, install_deps: bool = False) -> InstallResult:
    """Install the built binaries under DESTDIR/PREFIX (copy, symlink or the tree's own
    make install). First the shared libraries the build recorded (manifest runtime_deps) are
    checked on this host: missing ones are refused with the apt-get line, or installed with
    install_deps."""
    if mode not in MODES:
        raise InstallError(f"unknown install mode {mode!r}", hint="one of: " + ", ".join(MODES))
    recipe = _recipe(settings, recipe)
    builder = builder or settings.builder
    out, bm = load_build(settings, recipe, builder)
    prefix = _norm_prefix(prefix or recipe.install.get("prefix") or "/usr/local")
    destdir = _norm_destdir(destdir)
    root = _join(destdir, prefix)
    mpath = manifest_path(settings, destdir, prefix)
    m = _load_manifest(mpath) or _new_manifest(destdir, prefix)
    warnings: list[str] = []
    deps_installed = ensure_runtime_deps(settings, recipe, builder, bm,
                                         install_deps=install_deps, dry_run=dry_run,
                                         warnings=warnings)
    staging: Path | None = None
    try:
        if mode == "make-install":
            staging, items, more = _make_install_items(settings, recipe, builder, bm,
                                                       prefix, destdir, timeout)
            warnings += more
        else:
            items = _binary_items(recipe, out, bm, root, mode)
        if not items:
            raise InstallError(f"the build of {recipe.name}/{builder} lists no binaries",
                               hint="check artifacts.binaries in the recipe and rebuild")
        rows = _apply(items, m, "install", "install", dry_run=dry_run)
        noop = all(r.status == "already correct" for r in rows)
        if not dry_run and "_txn" in m:
            m["installs"].append({"recipe": recipe.name, "builder": builder, "mode": mode,
                                  "build_out": str(out),
                                  "build_source_sha256": bm.get("source_sha256"),
                                  "configured_prefix": (bm.get("config") or {}).get("prefix"),
                                  "configured_datadir": (bm.get("config") or {}).get("datadir"),
                                  "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            _save_manifest(mpath, m)
        configured = (bm.get("config") or {}).get("prefix")
        if configured and _norm_prefix(configured) != prefix:
            warnings.append(f"the binary was configured for prefix {configured}; installed under "
                            f"{root} it finds firmware only next to itself "
                            f"({root}/share/qemu): run `invoke install-bios` with the same "
                            "--prefix/--destdir")
        return InstallResult(prefix, destdir, root, mode, mpath, rows, noop, warnings,
                             deps_installed)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _make_install_items(settings: Settings, recipe: Recipe, builder: str, bm: dict[str, Any],
                        prefix: str, destdir: str, timeout: float
                        ) -> tuple[Path, list[_Item], list[str]]:
    """Run the kept build tree's `make install DESTDIR=<staging>`; items to copy from there."""
    build_dir = Path(bm.get("build_dir") or "")
    if not bm.get("build_dir") or not build_dir.is_dir():
        raise InstallError(f"the build tree of {recipe.name}/{builder} is gone "
                           f"({bm.get('build_dir') or 'not recorded'}); make-install needs it",
                           hint="use --mode copy, or rebuild with `invoke build --force`")
    tmp_parent = settings.state_dir / "tmp"
    tmp_parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="make-install-", dir=tmp_parent))
    os.chmod(staging, 0o755)
    cmd = list(recipe.build.get("install") or ["make", "install"]) + [f"DESTDIR={staging}"]
    try:
        if builder == "native":
            try:
                r = subprocess.run(cmd, cwd=build_dir, capture_output=True, text=True,
                                   timeout=timeout)
            except subprocess.TimeoutExpired:
                raise InstallError(f"`{' '.join(cmd)}` timed out after {timeout:.0f} s") from None
            log, rc = r.stdout + r.stderr, r.returncode
        else:
            rc, log = _make_install_docker(settings, builder, bm, build_dir, staging, cmd,
                                           timeout)
        if rc != 0:
            tail = "\n".join(log.strip().splitlines()[-15:])
            raise InstallError(f"`{' '.join(cmd[:2])}` failed in the {builder} builder "
                               f"(exit {rc}):\n{tail}",
                               hint="the build tree may be stale: `invoke build --force`")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    configured = _norm_prefix((bm.get("config") or {}).get("prefix") or prefix)
    items: list[_Item] = []
    warnings: list[str] = []
    for dirpath, dirnames, filenames in os.walk(staging):
        dirnames.sort()
        for fn in sorted(filenames):
            src = Path(dirpath) / fn
            rel = "/" + str(src.relative_to(staging))
            if os.path.islink(src):
                warnings.append(f"make install created a symlink {rel}; not installed")
                continue
            if rel.startswith(configured.rstrip("/") + "/"):
                target = prefix.rstrip("/") + rel[len(configured.rstrip("/")):]
            else:
                target = rel
            dest = _join(destdir, target)
            st = src.stat()
            rp = os.path.relpath(target, prefix) if target.startswith(prefix) else target
            kind = "binary" if st.st_mode & 0o111 and "/bin/" in "/" + rp else \
                ("firmware" if FIRMWARE_RE.search(fn) else "data")
            items.append(_Item(dest, src, sha256_file(src), stat.S_IMODE(st.st_mode), kind, fn))
    if not items:
        raise InstallError("`make install` installed nothing",
                           hint="check build.install in the recipe")
    return staging, items, warnings


def _make_install_docker(settings: Settings, builder: str, bm: dict[str, Any], build_dir: Path,
                         staging: Path, cmd: list[str], timeout: float) -> tuple[int, str]:
    from kvmlab.build import images
    info = images.ensure_image(settings, builder)
    client = images.docker_client()
    inner = bm.get("container_build_dir") or str(build_dir)
    container = None
    try:
        container = client.containers.run(
            info.id, cmd, detach=True, working_dir=inner, network_mode="none",
            user=f"{os.getuid()}:{os.getgid()}", environment=dict(bm.get("env") or {}),
            volumes={str(build_dir): {"bind": inner, "mode": "rw"},
                     str(staging): {"bind": str(staging), "mode": "rw"}},
            labels={"kvmlab": "make-install"})
        try:
            res = container.wait(timeout=timeout)
        except Exception:
            raise InstallError(f"`make install` in the {builder} builder timed out after "
                               f"{timeout:.0f} s") from None
        log = container.logs(stdout=True, stderr=True).decode("utf-8", "replace")
        return int(res.get("StatusCode", 1)), log
    finally:
        if container is not None:
            try:
                container.remove(force=True)
            except Exception:
                pass


# ---------------------------------------------------------------------------------------------
# uninstall
def uninstall(settings: Settings, *, prefix: str | None = None, destdir: str | None = None,
              recipe: Recipe | str | None = None, step: str | None = None, force: bool = False,
              manifest: Path | None = None) -> UninstallResult:
    """Remove exactly what install/install-bios wrote under DESTDIR+PREFIX; restore backups.

    A file changed since kvmlab wrote it is left alone (reported) unless force.
    step: only undo "install" or "install-bios" entries.
    """
    if manifest is None:
        if prefix is None:
            if recipe is None or isinstance(recipe, str):
                recipe = _recipe(settings, recipe)
            prefix = recipe.install.get("prefix") or "/usr/local"
        mpath = manifest_path(settings, destdir, prefix)
    else:
        mpath = manifest
    m = _load_manifest(mpath)
    if m is None:
        raise InstallError(f"nothing installed by kvmlab under "
                           f"{_join(_norm_destdir(destdir), _norm_prefix(prefix or '/'))} "
                           f"(no {mpath})",
                           hint="pass the same --prefix/--destdir as for install; installed "
                                "trees: " + (", ".join(sorted(
                                    p.name for p in (settings.state_dir / "installs").glob(
                                        "*.json"))) or "none"))
    entries = [e for e in m["files"] if step is None or e.get("step") == step]
    # pre-flight: every directory we touch must be writable
    dirs = {Path(e["path"]).parent for e in entries}
    bad = [d for d in dirs if d.is_dir() and not os.access(d, os.W_OK | os.X_OK)]
    if bad:
        reason = _why_unwritable(bad[0])
        hint = "run it with sudo" if os.geteuid() != 0 else "make it writable"
        raise InstallError(f"cannot write to {bad[0]}: {reason}; nothing was uninstalled",
                           hint=hint)
    removed, restored, skipped, kept = [], [], [], []
    keep: list[dict[str, Any]] = []
    for e in reversed(entries):
        p = Path(e["path"])
        cur = _describe_existing(p)
        mine = cur is not None and (
            (e.get("type") == "symlink" and cur["type"] == "symlink" and
             cur["target"] == e.get("target")) or
            (e.get("type") != "symlink" and cur["type"] == "file" and
             cur["sha256"] == e["sha256"]))
        if cur is not None and not mine and not force:
            skipped.append((str(p), "changed since kvmlab installed it (use --force)"))
            keep.append(e)
            continue
        rep = e.get("replaced")
        try:
            if rep and rep.get("backup") and os.path.lexists(rep["backup"]):
                os.replace(rep["backup"], p)
                restored.append(str(p))
            else:
                if rep and rep.get("backup"):
                    skipped.append((str(p), f"backup {rep['backup']} is gone; file removed"))
                if cur is not None:
                    os.unlink(p)
                removed.append(str(p))
            for ob in e.get("older_backups") or []:
                if ob and ob.get("backup") and os.path.lexists(ob["backup"]):
                    kept.append(ob["backup"])     # an even older original: the user decides
        except OSError as ex:
            skipped.append((str(p), ex.strerror or str(ex)))
            keep.append(e)
    dirs_removed = []
    remaining_dirs = []
    for d in sorted(m.get("dirs_created", []), key=lambda s: -len(Path(s).parts)):
        if step is not None and any(Path(k["path"]).is_relative_to(d) for k in m["files"]
                                    if k not in entries):
            remaining_dirs.append(d)
            continue
        try:
            os.rmdir(d)
            dirs_removed.append(d)
        except FileNotFoundError:
            pass
        except OSError:
            remaining_dirs.append(d)   # not empty: someone else put files there
    others = [e for e in m["files"] if e not in entries]
    m["files"] = others + list(reversed(keep))
    m["dirs_created"] = [d for d in m.get("dirs_created", []) if d in remaining_dirs]
    if step in (None, "install-bios") and not any(e.get("step") == "install-bios"
                                                  for e in m["files"]):
        m["bios"] = None
    if m["files"]:
        _save_manifest(mpath, m)
    else:
        _unlink_quiet(mpath)
    return UninstallResult(mpath, removed, restored, skipped, dirs_removed, kept)


# ---------------------------------------------------------------------------------------------
# asking a qemu binary where it looks
def qemu_version(qemu: Path, timeout: float = 10) -> str:
    try:
        r = subprocess.run([str(qemu), "-version"], capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL, cwd="/")
    except subprocess.TimeoutExpired:
        raise InstallError(f"{qemu} -version did not answer within {timeout:.0f} s") from None
    except OSError as e:
        raise InstallError(f"cannot run {qemu}: {e.strerror}",
                           hint="is it an executable for this machine?") from None
    if r.returncode != 0:
        raise InstallError(f"{qemu} -version failed (exit {r.returncode}): "
                           f"{(r.stderr or r.stdout).strip()[:300]}",
                           hint="missing shared libraries? try `ldd " + str(qemu) + "`")
    return (r.stdout.strip().splitlines() or [""])[0]


def _version_tuple(version_line: str) -> tuple[int, ...]:
    mo = re.search(r"version (\d+)\.(\d+)", version_line)
    return (int(mo.group(1)), int(mo.group(2))) if mo else (0, 0)


def qemu_l_help(qemu: Path, timeout: float = 10) -> list[Path] | None:
    """`qemu -L help` (QEMU >= 5.x): the data directories, in search order."""
    try:
        r = subprocess.run([str(qemu), "-L", "help"], capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL, cwd="/")
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [ln.strip() for ln in r.stdout.splitlines() if ln.strip()]
    if r.returncode != 0 or not lines or not all(ln.startswith("/") for ln in lines):
        return None
    return [Path(os.path.normpath(ln)) for ln in lines]


_STRACE_RE = re.compile(
    r'^(?:\[pid\s+\d+\]\s+|\d+\s+)?(open|openat|access|faccessat2?|stat|newfstatat|statx)'
    r'\((?:AT_FDCWD, |-?\d+, )?"((?:[^"\\]|\\.)*)"[^=]*?\)\s*=\s*(-?\d+)')


def _parse_strace(text: str) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    for line in text.splitlines():
        mo = _STRACE_RE.match(line.strip())
        if not mo:
            continue
        path = mo.group(2)
        if not FIRMWARE_RE.search(path) or path.startswith(("/proc/", "/sys/", "/dev/")):
            continue
        if not path.startswith("/"):
            continue
        out.append((os.path.normpath(path), int(mo.group(3)) >= 0))
    return out


_FATAL_RES = [
    re.compile(r"could not load PC BIOS '([^']+)'"),
    re.compile(r'failed to find romfile "([^"]+)"'),
    re.compile(r"could not load VGA BIOS '([^']+)'"),
]
_WARN_RES = [
    re.compile(r"Could not open option rom '([^']+)'"),
    re.compile(r"could not load VGA BIOS '([^']+)'"),
    re.compile(r"Could not load option rom '([^']+)'"),
]


# lines printed by a binary built with patches/<recipe>/debug-bios-path.patch
_DEBUG_TRY_RE = re.compile(r"^qemu: (?:(loading) firmware '([^']+)' from '([^']+)'|"
                           r"firmware '([^']+)' not found at '([^']+)')", re.M)
_DEBUG_DIR_RE = re.compile(r"^qemu: firmware directory '([^']+)' \(([^)]+)\)", re.M)


def _headless_args(version: tuple[int, ...], sock: Path) -> list[str]:
    args = ["-S", "-nographic", "-serial", "null", "-parallel", "none",
            "-monitor", f"unix:{sock},server,nowait"]
    return args


def run_probe(qemu: Path, *, timeout: float = 20, use_strace: bool | None = None,
              extra_args: list[str] | None = None, env: dict[str, str] | None = None
              ) -> ProbeRun:
    """Start qemu paused and headless with a monitor on a unix socket; quit it via the monitor.

    started=True when it stayed alive and its monitor answered (it got past firmware loading).
    Under strace (when installed), every firmware-like path it tried is recorded.
    """
    strace = shutil.which("strace") if use_strace in (None, True) else None
    if use_strace and not strace:
        raise InstallError("strace is not installed", hint="apt-get install strace")
    version = _version_tuple(qemu_version(qemu))
    work = Path(tempfile.mkdtemp(prefix="kvmlab-probe-"))
    sock = work / "mon.sock"
    trace = work / "strace.out"
    argv = [str(qemu), *_headless_args(version, sock), *(extra_args or [])]
    full = ([strace, "-f", "-qq", "-s", "4096", "-o", str(trace), "-e",
             "trace=open,openat,access,faccessat,faccessat2"] if strace else []) + argv
    errf = open(work / "stderr", "w+b")
    proc = None
    banner = ""
    started = False
    code: int | None = None
    try:
        proc = subprocess.Popen(full, cwd=work, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=errf, start_new_session=True,
                                env={**os.environ, **(env or {})})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if sock.exists():
                try:
                    banner = _monitor_quit(sock, max(1.0, deadline - time.monotonic()))
                    started = bool(banner)
                except OSError:
                    banner = ""
                if started:
                    break
            time.sleep(0.05)
        if started:
            try:
                code = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                code = None
        else:
            code = proc.poll()
    finally:
        if proc is not None:
            kill_group(proc)
        errf.seek(0)
        stderr = errf.read().decode("utf-8", "replace")
        errf.close()
        attempts = _parse_strace(trace.read_text(errors="replace")) if trace.exists() else []
        shutil.rmtree(work, ignore_errors=True)
    if strace and not started and not attempts and _strace_refused(stderr):
        # ptrace not allowed here (e.g. a container without CAP_SYS_PTRACE): ask without it
        return run_probe(qemu, timeout=timeout, use_strace=False, extra_args=extra_args, env=env)
    # a binary built with the debug-bios-path patch reports its lookups itself
    seen_paths = {p for p, _ in attempts}
    for mo in _DEBUG_TRY_RE.finditer(stderr):
        path = os.path.normpath(mo.group(3) or mo.group(5))
        ok = mo.group(1) == "loading"
        if path.startswith("/") and (path, ok) not in attempts and (
                not strace or path not in seen_paths):
            attempts.append((path, ok))
    reported_dirs = [(m.group(1), m.group(2)) for m in _DEBUG_DIR_RE.finditer(stderr)]
    fatal, warn = [], []
    for rx in _FATAL_RES:
        for mo in rx.finditer(stderr):
            n = os.path.basename(mo.group(1))
            if rx.pattern.startswith("could not load VGA") and started:
                continue
            if n not in fatal:
                fatal.append(n)
    for rx in _WARN_RES:
        for mo in rx.finditer(stderr):
            n = os.path.basename(mo.group(1))
            if n not in warn and n not in fatal:
                warn.append(n)
    if started:
        warn += [n for n in fatal if n not in warn]
        fatal = []
    loaded = {}
    for p, ok in attempts:
        if ok:
            loaded.setdefault(os.path.basename(p), p)
    return ProbeRun(qemu, argv, started, code, stderr, banner, attempts, fatal, warn, loaded,
                    bool(strace), reported_dirs)


def _strace_refused(stderr: str) -> bool:
    return any(ln.startswith("strace:") and ("PTRACE" in ln or "Operation not permitted" in ln)
               for ln in stderr.splitlines())


def _monitor_quit(sock: Path, timeout: float) -> str:
    """Connect to the HMP monitor, read its banner, check `info status`, send quit."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(min(timeout, 10))
    try:
        s.connect(str(sock))
        buf = b""
        end = time.monotonic() + min(timeout, 10)
        while b"(qemu)" not in buf and time.monotonic() < end:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
        if b"(qemu)" not in buf:
            return ""
        s.sendall(b"quit\n")
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
        return buf.decode("utf-8", "replace").split("\n")[0].strip()
    finally:
        s.close()


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


def find_search_dirs(qemu: Path, *, datadir_hint: str | None = None, probe: bool = True,
                     timeout: float = 20, share_suffix: str = "share/qemu") -> SearchInfo:
    """Where this binary looks for bios.bin & co (after install-bios creates its data dir)."""
    qemu = Path(qemu)
    version = qemu_version(qemu)
    vt = _version_tuple(version)
    explain: list[tuple[str, str, str]] = []
    compiled = None
    real = Path(os.path.realpath(qemu))
    dirs: list[Path] = []
    method = ""
    lhelp = qemu_l_help(qemu) if vt >= (2, 0) else None
    if lhelp:
        dirs = lhelp
        method = "-L help"
        for d in lhelp:
            explain.append(("qemu -L help", str(d), "searched in this order"))
    else:
        up = real.parent.parent
        share, pcb = up / share_suffix, up / "pc-bios"
        compiled = _compiled_datadirs(real, datadir_hint)
        explain.append(("0.12 rule: -L", "(not given)", "-L DIR would win"))
        explain.append(("0.12 rule: exe", str(real), "realpath of the binary"))
        explain.append(("0.12 rule: 1st", str(share),
                        "exists: used" if share.is_dir() else "absent"))
        explain.append(("0.12 rule: 2nd", str(pcb),
                        "exists: used" if pcb.is_dir() and not share.is_dir() else
                        ("exists, but share/qemu wins" if pcb.is_dir() else "absent")))
        explain.append(("0.12 rule: 3rd", compiled or "?",
                        "compiled-in CONFIG_QEMU_SHAREDIR, used when neither exists"))
        target = pcb if pcb.is_dir() and not share.is_dir() else share
        dirs = [target]
        method = "0.12 rule"
    run = None
    if probe:
        run = run_probe(qemu, timeout=timeout)
        bios_tries = [p for p, _ in run.attempts if BIOS_RE.match(os.path.basename(p))]
        seen: list[Path] = []
        for p in bios_tries:
            d = Path(os.path.dirname(p))
            if d not in seen:
                seen.append(d)
        for d in seen:
            hits = sorted({os.path.basename(p) for p, ok in run.attempts
                           if ok and os.path.dirname(p) == str(d) and BIOS_RE.match(
                               os.path.basename(p))})
            misses = sorted({os.path.basename(p) for p, ok in run.attempts
                             if not ok and os.path.dirname(p) == str(d) and BIOS_RE.match(
                                 os.path.basename(p))} - set(hits))
            explain.append(("observed (strace)" if run.strace else "reported by the binary",
                            str(d), "; ".join(
                                ([f"found {', '.join(hits)}"] if hits else []) +
                                ([f"looked for {', '.join(misses)}: absent"] if misses
                                 else []))))
        for d, how in run.reported_dirs:
            explain.append(("reported (debug-bios-path)", d, how))
        if run.missing_fatal:
            explain.append(("observed (stderr)", "", "missing: " + ", ".join(run.missing_fatal)))
        if method == "0.12 rule" and seen:
            current = seen
            up = real.parent.parent
            allowed = {up / share_suffix, up / "pc-bios"} | (
                {Path(compiled)} if compiled else set())
            if not set(current) <= allowed:
                # the binary does not behave like 0.12: trust what it did
                dirs = current
                method = "observed (strace)"
                explain.append(("decision", ", ".join(map(str, dirs)),
                                "the binary searched elsewhere than the 0.12 rule predicts: "
                                "using what it tried"))
        elif method == "-L help" and seen and not set(seen) <= set(dirs):
            for d in seen:
                if d not in dirs:
                    dirs.append(d)
    return SearchInfo(qemu, version, dirs, method, explain, compiled, run)


# ---------------------------------------------------------------------------------------------
# install-bios
def _find_installed_binary(settings: Settings, m: dict[str, Any] | None, root: Path,
                           recipe: Recipe) -> Path | None:
    cand = binary_path(recipe, root)
    if m:
        for e in m["files"]:
            if e.get("name") == QEMU_NAME or os.path.basename(e["path"]) == cand.name:
                if e.get("kind") == "binary" and os.path.exists(e["path"]):
                    return Path(e["path"])
    return cand if cand.exists() else None


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
    recipe = _recipe(settings, recipe)
    builder = builder or settings.builder
    destdir_n = _norm_destdir(destdir)
    warnings: list[str] = []
    # sources: the build's firmware, then the extra dirs
    sources: dict[str, tuple[Path, str, str]] = {}   # name -> (path, sha, kind)
    recipe_names: list[str] = []
    bm: dict[str, Any] = {}
    try:
        out, bm = load_build(settings, recipe, builder)
        for a in bm.get("artifacts", []):
            if a.get("kind") in ("firmware", "option_rom", "data"):
                # name relative to the data dir: bios.bin, or keymaps/en-us for data files
                n = a["path"].split("/", 1)[1]
                sources[n] = (out / a["path"], a["sha256"], a["kind"])
                recipe_names.append(n)
    except InstallError:
        if qemu is None or not (firmware_from or dry_run):
            raise
        warnings.append(f"no build of {recipe.name}/{builder}: only files from "
                        f"{', '.join(map(str, firmware_from))} can be installed")
    have = set(recipe_names)
    for key in ("firmware", "option_roms"):
        for rel in recipe.artifacts.get(key, ()):
            n = os.path.basename(rel)
            if bm and n not in have:
                warnings.append(f"{n}: listed by the recipe ({key}) but not in the build output")
    extra_dirs = [Path(d) for d in firmware_from]
    for d in extra_dirs:
        if not d.is_dir():
            raise InstallError(f"--firmware-from {d}: not a directory")

    def source_for(name: str) -> tuple[Path, str, str] | None:
        if name in sources:
            return sources[name]
        for d in extra_dirs:
            p = d / name
            if p.is_file():
                rp = Path(os.path.realpath(p))
                return (rp, sha256_file(rp), "firmware")
        return None

    # which binary, which manifest
    if qemu is not None:
        qpath = Path(os.path.abspath(os.path.expanduser(str(qemu))))
        if not qpath.exists():
            raise InstallError(f"--qemu {qemu}: no such file")
        if prefix is None:
            prefix = str(Path(os.path.realpath(qpath)).parent.parent) if not destdir_n else \
                (recipe.install.get("prefix") or "/usr/local")
        prefix_n = _norm_prefix(prefix)
        mpath = manifest_path(settings, destdir_n, prefix_n)
        m = _load_manifest(mpath) or _new_manifest(destdir_n, prefix_n)
    else:
        prefix_n = _norm_prefix(prefix or recipe.install.get("prefix") or "/usr/local")
        mpath = manifest_path(settings, destdir_n, prefix_n)
        m = _load_manifest(mpath) or _new_manifest(destdir_n, prefix_n)
        root = _join(destdir_n, prefix_n)
        found = _find_installed_binary(settings, m, root, recipe)
        if found is None:
            raise InstallError(f"no installed {QEMU_NAME} under {root}",
                               hint="run `invoke install` first (same --prefix/--destdir), or "
                                    "pass --qemu PATH")
        qpath = found
    datadir_hint = (bm.get("config") or {}).get("datadir")
    search = find_search_dirs(qpath, datadir_hint=datadir_hint, timeout=timeout,
                              share_suffix=recipe.install.get("datadir") or "share/qemu")
    compat = []
    for c in recipe.install.get("firmware_compat_dirs") or []:
        compat.append(_join(destdir_n, c if c.startswith("/") else f"{prefix_n}/{c}"))
    targets: list[Path] = []

    def add_targets(dirs: Iterable[Path]) -> list[Path]:
        added = []
        for d in dirs:
            # one directory reached two ways (a symlinked data dir) is written once
            if os.path.realpath(d) in {os.path.realpath(t) for t in targets}:
                continue
            if destdir_n and not str(d).startswith(destdir_n.rstrip("/") + "/"):
                warnings.append(f"the binary also searches {d}, outside --destdir {destdir_n}: "
                                "not writing there")
                continue
            targets.append(d)
            added.append(d)
        return added

    add_targets([*search.dirs, *compat])

    asked: list[str] = []
    if search.probe:
        asked = [n for n in search.probe.missing_fatal + search.probe.missing_warn]
    names = list(dict.fromkeys(recipe_names + [n for n in asked if source_for(n)]))
    rows: list[FileRow] = []
    missing_rows: dict[str, FileRow] = {}

    def bios_record() -> dict[str, Any]:
        return {"qemu": str(qpath), "version": search.version,
                "search_dirs": [str(d) for d in search.dirs],
                "compat_dirs": [str(d) for d in compat], "method": search.method,
                "files": sorted(done_names), "recipe_files": recipe_names}

    proof: ProbeRun | None = None
    done_names: set[str] = set()
    for _round in range(max_rounds):
        items = []
        for n in names:
            if n in done_names:
                continue
            src = source_for(n)
            if src is None:
                continue
            p, sha, kind = src
            for d in targets:
                items.append(_Item(d / n, p, sha, 0o644, kind, n))
            done_names.add(n)
        if items:
            new_rows = _apply(items, m, "install-bios", "install-bios", dry_run=dry_run)
            if not dry_run:
                m["bios"] = bios_record()
                _save_manifest(mpath, m)
            rows += new_rows
        if dry_run or not prove:
            break
        proof = run_probe(qpath, timeout=timeout)
        more = [n for n in proof.missing_fatal + proof.missing_warn
                if n not in done_names and source_for(n)]
        for n in proof.missing_fatal + proof.missing_warn:
            if not source_for(n) and n not in missing_rows:
                tried = proof.tried(n) or [str(d / n) for d in targets]
                missing_rows[n] = FileRow(tried[0], "(no source)", "",
                                          "missing (fatal)" if n in proof.missing_fatal
                                          else "missing (warning)", name=n)
        # the binary looked somewhere we did not predict: believe it, install there too
        new_dirs: list[Path] = []
        known = {os.path.realpath(t) for t in targets}
        for n in proof.missing_fatal:
            if not source_for(n):
                continue          # installing elsewhere cannot help: we do not have the file
            for t in proof.tried(n):
                d = Path(os.path.dirname(t))
                if os.path.realpath(d) not in known and d not in new_dirs:
                    new_dirs.append(d)
        new_dirs = add_targets(new_dirs)
        if new_dirs:
            search.dirs += new_dirs
            for d in new_dirs:
                search.explain.append(("observed after install", str(d),
                                       "the binary searched here too: installing here as well"))
            done_names.clear()
            continue
        if not more:
            break
        names += more
    if not dry_run and m.get("bios") != bios_record() and \
            (m["files"] or mpath.exists()):
        m["bios"] = bios_record()
        _save_manifest(mpath, m)
    # a path planned twice (after a newly observed directory) is reported once, by what happened
    by_path: dict[str, FileRow] = {}
    for r in rows:
        if r.path not in by_path or by_path[r.path].status == "already correct":
            by_path[r.path] = r
    rows = list(by_path.values()) + list(missing_rows.values())
    noop = all(r.status == "already correct" for r in rows if r.source != "(no source)")
    return BiosResult(qpath, search, rows, noop, proof, None if dry_run else mpath, warnings)


def explain_failure(proof: ProbeRun) -> str:
    """One paragraph: what the binary said and the exact paths it tried."""
    lines = []
    msg = [ln for ln in proof.stderr.splitlines() if ln.strip()]
    if msg:
        lines.append("it said: " + " | ".join(msg[-4:]))
    names = proof.missing_fatal or [n for n in ("bios.bin", "bios-256k.bin")
                                    if proof.tried(n)]
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


# ---------------------------------------------------------------------------------------------
# for other steps
def list_manifests(settings: Settings) -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for p in sorted((settings.state_dir / "installs").glob("*.json")):
        try:
            out.append((p, json.loads(p.read_text())))
        except (OSError, ValueError):
            continue
    return out


def installed_qemu(settings: Settings, prefix: str | None = None) -> Path | None:
    """The qemu-system-x86_64 kvmlab installed (a real install, i.e. no DESTDIR, preferred;
    with prefix: the one under that prefix). None when there is none."""
    cands: list[tuple[int, str, Path]] = []
    want = _norm_prefix(prefix) if prefix else None
    for _p, m in list_manifests(settings):
        if want and (m.get("prefix") != want or m.get("destdir")):
            continue
        for e in m.get("files", []):
            if e.get("kind") == "binary" and (e.get("name") == QEMU_NAME or
                                              os.path.basename(e["path"]) == QEMU_NAME):
                p = Path(e["path"])
                if os.access(p, os.X_OK):
                    cands.append((0 if not m.get("destdir") else 1,
                                  str(m.get("updated", "")), p))
    if not cands:
        return None
    cands.sort(key=lambda c: c[1], reverse=True)     # newest first ...
    cands.sort(key=lambda c: c[0])                   # ... real installs before DESTDIR ones
    return cands[0][2]
