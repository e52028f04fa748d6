"""The install transaction: check every destination, write by temp+rename with backups, roll
back on any error, and keep the install manifest.

Install manifest: one JSON file per DESTDIR+PREFIX pair (``InstallTarget``), at
``<state_dir>/installs/<slug>-<hash12>.json`` where hash12 = sha256("<destdir>\\0<prefix>")[:12]
and slug is the prefix with "/" turned into "_" (readable only). It lists every file kvmlab wrote
(path, sha256, mode, uid/gid, which step wrote it, what it replaced and where the backup is) and
every directory it created; ``uninstall`` walks it backwards. install and install-bios for the
same DESTDIR+PREFIX share one manifest (``kvmlab.model.manifests.InstallManifest``).

Backups: an existing file that differs is hard-linked (same inode, owner, mode) to
``<file>.kvmlab-bak`` (``.kvmlab-bak.N`` when taken) next to it before the new file is renamed
over it; uninstall renames the backup back, which restores the exact previous file.

Writes: every destination is checked first (kvmlab.install.preflight); then each file is
written to a temp file in the same directory and renamed into place. Any error (ENOSPC
included) rolls back everything this run wrote.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from kvmlab.core.errors import InstallError, KvmlabError
from kvmlab.core.fsutil import atomic_write_json, sha256_file
from kvmlab.core.records import utc_stamp
from kvmlab.core.settings import Settings
from kvmlab.install.preflight import os_error, preflight
from kvmlab.model.manifests import InstallManifest, InstallTarget, ManifestError
from kvmlab.model.recipe import Recipe, load_recipe

BACKUP_SUFFIX = ".kvmlab-bak"
DEFAULT_PREFIX = "/usr/local"
QEMU_NAME = "qemu-system-x86_64"


# ---------------------------------------------------------------------------------------------
# what a transaction writes, and what it reports
@dataclass
class FileRow:
    path: str
    source: str
    sha256: str
    status: str        # installed / already correct / replaced, backup at ... / would ... / missing
    backup: str | None = None
    name: str = ""


@dataclass
class Item:
    """One file (or symlink, when link_target is set) to put at dest."""
    dest: Path
    src: Path | None            # None for symlinks
    sha256: str
    mode: int
    kind: str
    name: str
    link_target: Path | None = None

    @property
    def origin(self) -> str:
        return str(self.src or self.link_target)


# ---------------------------------------------------------------------------------------------
# where: the recipe, the target and its manifest
def recipe_of(settings: Settings, recipe: Recipe | str | None) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    return load_recipe(settings.recipes_dir, recipe or settings.recipe)


def target(prefix: str | Path | None, destdir: str | Path | None = None,
           recipe: Recipe | None = None) -> InstallTarget:
    """DESTDIR + PREFIX resolved once: "~" expanded, relative paths made absolute; no prefix
    given: the recipe's (install.prefix), else /usr/local."""
    p = prefix or (recipe.install.get("prefix") if recipe else None) or DEFAULT_PREFIX
    d = os.path.expanduser(str(destdir)) if destdir else None
    try:
        return InstallTarget.of(os.path.abspath(os.path.expanduser(str(p))), d)
    except ManifestError as e:
        raise InstallError(e.message, hint=e.hint) from None


def manifest_path_for(settings: Settings, t: InstallTarget) -> Path:
    h = hashlib.sha256(f"{t.destdir}\0{t.prefix}".encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", (t.destdir + t.prefix).strip("/"))[-60:] or "root"
    return settings.state_dir / "installs" / f"{slug}-{h}.json"


def manifest_path(settings: Settings, destdir: str | None, prefix: str) -> Path:
    return manifest_path_for(settings, target(prefix, destdir))


def load_manifest(path: Path) -> InstallManifest | None:
    """The install manifest at path (any kvmlab's), None when there is none."""
    if not path.exists():
        return None
    try:
        return InstallManifest.load(path)
    except ManifestError as e:
        raise InstallError(f"install manifest {path} is unreadable: {e.message}",
                           hint="move it away to start over (files it lists stay installed)"
                           ) from None


def new_manifest(t: InstallTarget) -> InstallManifest:
    return InstallManifest(destdir=t.destdir, prefix=t.prefix, root=str(t.root))


def open_manifest(settings: Settings, t: InstallTarget) -> tuple[Path, InstallManifest]:
    """The manifest of target t (a new, empty one when nothing was installed there yet)."""
    path = manifest_path_for(settings, t)
    return path, load_manifest(path) or new_manifest(t)


def now() -> str:
    return utc_stamp()


def save_manifest(path: Path, m: InstallManifest, txn: Txn | None = None) -> None:
    """Write m; then commit txn (its writes become final), or roll it back if m cannot be
    written."""
    m.updated = now()
    data = m.to_dict()
    data.setdefault("bios", None)          # the layout always had the key ("bios": null)
    try:
        atomic_write_json(path, dict(sorted(data.items())))
    except OSError as e:
        if txn is not None:
            txn.rollback()
        raise InstallError(f"cannot write the install manifest {path}: {e.strerror}; rolled back",
                           hint="check the state directory (KVMLAB_STATE_DIR)") from None
    if txn is not None:
        txn.commit()


def list_manifests(settings: Settings) -> list[tuple[Path, InstallManifest]]:
    """Every readable install manifest in the state dir (unreadable ones are skipped)."""
    out = []
    for p in sorted((settings.state_dir / "installs").glob("*.json")):
        try:
            out.append((p, InstallManifest.load(p)))
        except KvmlabError:
            continue
    return out


def _is_qemu_binary(e: dict[str, Any]) -> bool:
    return e.get("kind") == "binary" and (e.get("name") == QEMU_NAME or
                                          os.path.basename(e["path"]) == QEMU_NAME)


def installed_qemu(settings: Settings, prefix: str | None = None) -> Path | None:
    """The qemu-system-x86_64 kvmlab installed (a real install, i.e. no DESTDIR, preferred;
    with prefix: the one under that prefix). None when there is none."""
    cands: list[tuple[int, str, Path]] = []
    want = target(prefix).prefix if prefix else None
    for _p, m in list_manifests(settings):
        if want and (m.prefix != want or m.destdir):
            continue
        for e in m.files:
            if _is_qemu_binary(e) and os.access(e["path"], os.X_OK):
                cands.append((0 if not m.destdir else 1, m.updated, Path(e["path"])))
    if not cands:
        return None
    cands.sort(key=lambda c: c[1], reverse=True)     # newest first ...
    cands.sort(key=lambda c: c[0])                   # ... real installs before DESTDIR ones
    return cands[0][2]


# ---------------------------------------------------------------------------------------------
# the transaction: atomic writes, backups, rollback
def _copy_data(src: IO[bytes], dst: IO[bytes]) -> None:   # tests monkeypatch this
    shutil.copyfileobj(src, dst, 1 << 20)


def unlink_quiet(p: str | Path) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def _free_backup_name(path: Path) -> Path:
    b = path.with_name(path.name + BACKUP_SUFFIX)
    n = 1
    while os.path.lexists(b):
        b = path.with_name(f"{path.name}{BACKUP_SUFFIX}.{n}")
        n += 1
    return b


def describe_existing(path: Path) -> dict[str, Any] | None:
    """What is at path now: {"type": "symlink", target} or {"type": "file", sha256, mode, uid,
    gid}; None when nothing is there."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISLNK(st.st_mode):
        return {"type": "symlink", "target": os.readlink(path)}
    return {"type": "file", "sha256": sha256_file(path), "mode": f"{stat.S_IMODE(st.st_mode):04o}",
            "uid": st.st_uid, "gid": st.st_gid}


def still_ours(e: dict[str, Any], cur: dict[str, Any] | None) -> bool:
    """True when cur (describe_existing) is what the manifest entry e says kvmlab wrote."""
    if cur is None:
        return False
    if e.get("type") == "symlink":
        return cur["type"] == "symlink" and cur["target"] == e.get("target")
    return cur["type"] == "file" and cur["sha256"] == e["sha256"]


class Txn:
    """Journal of what this run changed, so any error rolls it all back."""

    def __init__(self, what: str):
        self.what = what
        self.journal: list[tuple[str, Path, Path | None]] = []
        self.temporary: list[Path] = []   # backups of our own older files, dropped on commit

    def commit(self) -> None:
        for p in self.temporary:
            unlink_quiet(p)
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
                raise os_error(e, m, self.what) from None
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
                unlink_quiet(tmp)
            if isinstance(e, OSError):
                raise os_error(e, dest, self.what) from None
            raise
        return bpath

    def put_symlink(self, dest: Path, link_target: Path, backup: bool) -> Path | None:
        bpath = None
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.kvmlab-tmp")
        try:
            if os.path.lexists(dest) and backup:
                bpath = self._backup(dest)
            existed = os.path.lexists(dest)
            unlink_quiet(tmp)
            os.symlink(link_target, tmp)
            self.journal.append(("tmp", tmp, None))
            os.replace(tmp, dest)
            self.journal[-1] = ("replaced" if existed else "created", dest, bpath)
        except OSError as e:
            unlink_quiet(tmp)
            raise os_error(e, dest, self.what) from None
        return bpath

    def put(self, it: Item, backup: bool) -> Path | None:
        if it.link_target is not None:
            return self.put_symlink(it.dest, it.link_target, backup)
        assert it.src is not None
        return self.put_file(it.dest, it.src, it.mode, backup)

    def _undo(self, kind: str, path: Path, extra: Path | None) -> None:
        if kind in ("created", "tmp"):
            unlink_quiet(path)
        elif kind == "replaced" and extra is not None:
            os.replace(extra, path)
        elif kind == "backup":
            # still present only if "replaced" did not happen (or was undone above)
            if os.path.lexists(path) and extra is not None and os.path.lexists(extra):
                unlink_quiet(path)
        elif kind == "dir":
            os.rmdir(path)

    def rollback(self) -> None:
        for kind, path, extra in reversed(self.journal):
            try:
                self._undo(kind, path, extra)
            except OSError:
                pass
        self.journal.clear()


# ---------------------------------------------------------------------------------------------
# apply: plan, check and write a list of items as one transaction
Todo = tuple[Item, dict[str, Any] | None, dict[str, Any] | None]   # item, current, ours


def _is_real_dir(p: Path) -> bool:
    return os.path.isdir(p) and not os.path.islink(p)


def _already_correct(it: Item, cur: dict[str, Any]) -> bool:
    if it.link_target is not None:
        return cur["type"] == "symlink" and cur["target"] == str(it.link_target)
    return cur["type"] == "file" and cur["sha256"] == it.sha256 and cur["mode"] == f"{it.mode:04o}"


def _plan(items: list[Item], m: InstallManifest, step: str
          ) -> tuple[list[FileRow], list[Todo], list[dict[str, Any]]]:
    """(rows of files already correct, files to write, entries to adopt)."""
    rows: list[FileRow] = []
    todo: list[Todo] = []
    adopted: list[dict[str, Any]] = []
    for it in items:
        if _is_real_dir(it.dest):
            todo.append((it, None, None))
            continue
        cur = describe_existing(it.dest)
        if cur is not None and _already_correct(it, cur):
            rows.append(FileRow(str(it.dest), it.origin, it.sha256, "already correct",
                                name=it.name))
            if m.entry(it.dest) is None:
                # the same file, put there by someone else (another state dir, a hand copy):
                # recorded so the checks see it; uninstall leaves it where it was
                adopted.append({**_entry(it, step, None, None, None, None), "adopted": True})
            continue
        old = m.entry(it.dest)
        todo.append((it, cur, old if old is not None and still_ours(old, cur) else None))
    return rows, todo, adopted


def _dry_row(it: Item, cur: dict[str, Any] | None, owned: dict[str, Any] | None) -> FileRow:
    if _is_real_dir(it.dest):
        st = "blocked: a directory is in the way"
    elif cur is None:
        st = "would install"
    else:
        st = "would update" if owned else "would replace (backup first)"
    return FileRow(str(it.dest), it.origin, it.sha256, st, name=it.name)


def _entry(it: Item, step: str, cur: dict[str, Any] | None, old: dict[str, Any] | None,
           owned: dict[str, Any] | None, bpath: Path | None) -> dict[str, Any]:
    """The manifest entry for it, just written (bpath: the backup of a file not ours)."""
    st = os.lstat(it.dest)
    entry: dict[str, Any] = {
        "path": str(it.dest), "name": it.name, "kind": it.kind, "step": step,
        "type": "symlink" if it.link_target is not None else "file", "sha256": it.sha256,
        "mode": f"{it.mode:04o}", "uid": st.st_uid, "gid": st.st_gid, "source": it.origin}
    if it.link_target is not None:
        entry["target"] = str(it.link_target)
    if old is not None and owned is not None:
        entry["replaced"] = old.get("replaced")     # keep the pre-kvmlab original
    else:
        entry["replaced"] = {**cur, "backup": str(bpath)} if cur else None
        if old is not None and cur is not None:
            # changed behind our back since the last install: remember the newest original,
            # keep older backups recorded too
            entry["older_backups"] = [old.get("replaced")] if old.get("replaced") else []
    return entry


def _write(todo: list[Todo], m: InstallManifest, step: str, txn: Txn
           ) -> tuple[list[FileRow], list[dict[str, Any]]]:
    rows: list[FileRow] = []
    entries: list[dict[str, Any]] = []
    for it, cur, owned in todo:
        need_backup = cur is not None and owned is None
        # an older file of ours is also linked aside, so a rollback can put it back; that link
        # is dropped on commit
        bpath = txn.put(it, cur is not None)
        if bpath is not None and not need_backup:
            txn.temporary.append(bpath)
            bpath = None
        entries.append(_entry(it, step, cur, m.entry(it.dest), owned, bpath))
        status = ("installed" if cur is None else
                  f"replaced, backup at {bpath}" if need_backup else "updated")
        rows.append(FileRow(str(it.dest), it.origin, it.sha256, status,
                            backup=str(bpath) if bpath else None, name=it.name))
    return rows, entries


def _record(m: InstallManifest, entries: list[dict[str, Any]], created: list[Path]) -> None:
    for e in entries:
        old = m.entry(e["path"])
        if old is not None:
            m.files[m.files.index(old)] = e
        else:
            m.files.append(e)
    for d in created:
        if str(d) not in m.dirs_created:
            m.dirs_created.append(str(d))


def apply(items: list[Item], m: InstallManifest, step: str, what: str,
          dry_run: bool = False) -> tuple[list[FileRow], Txn | None]:
    """Plan, check and write items as one transaction; record them in m (in memory).

    Returns the rows and the open transaction (None: nothing was written) that
    ``save_manifest`` commits once m is on disk -- or rolls back if it cannot be written."""
    rows, todo, adopted = _plan(items, m, step)
    if dry_run:
        return rows + [_dry_row(*t) for t in todo], None
    if not todo:
        if not adopted:
            return rows, None
        _record(m, adopted, [])
        return rows, Txn(what)      # nothing written: the manifest alone changes
    dirs = {it.dest.parent for it, _, _ in todo}
    preflight([(it.dest, os.path.getsize(it.src) if it.src else 0) for it, _, _ in todo],
              dirs, what)
    txn = Txn(what)
    created: list[Path] = []
    try:
        for d in sorted(dirs, key=lambda p: len(p.parts)):
            created += txn.mkdirs(d)
        written, entries = _write(todo, m, step, txn)
    except BaseException:
        txn.rollback()
        raise
    _record(m, entries + adopted, created)
    return rows + written, txn
