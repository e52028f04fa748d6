"""Small filesystem helpers shared by the steps: hashing, atomic writes, directory swaps."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tree_sha256(root: Path) -> str:
    """A content hash of a directory tree: relative paths, types, exec bits, contents, link targets.

    Stable across copies (ignores mtimes, owners and other mode bits).
    """
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in sorted(filenames + links):
            p = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                entry = f"L {rel} {os.readlink(p)}"
            elif stat.S_ISREG(st.st_mode):
                entry = f"F {rel} {'x' if st.st_mode & 0o111 else '-'} {sha256_file(Path(p))}"
            else:
                entry = f"S {rel} {stat.S_IFMT(st.st_mode):o}"
            h.update(entry.encode("utf-8", "surrogateescape") + b"\0")
        if not filenames and not dirnames:
            h.update(f"D {os.path.normpath(rel_dir)}".encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write data to path through a temp file in the same directory + os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # manifests and locks must survive a crash once renamed
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def json_sha256(data: Any) -> str:
    """sha256 of a JSON-able value in canonical form (sorted keys): input hashes of the steps."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def read_json(path: Path, default: Any = None) -> Any:
    """The JSON content of path, or default when it does not exist; ValueError when corrupt."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default


def replace_dir(new: Path, dest: Path) -> None:
    """Put directory new in place of dest (same filesystem); dest is never half-written."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, old / dest.name)
    os.replace(new, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
