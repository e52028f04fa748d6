"""Test helpers for install / install-bios: a fake build output (out dir + manifest.json in the
layout kvmlab.build.qemu writes), made from the lead's fake qemu-like tree built natively with the
host's C compiler (no docker), and tree hashing to prove "exact previous state".
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

from support.fakeqemu import build_fake_qemu_native, fake_recipe_toml, write_fake_qemu_tree

FAKE_RECIPE = "fake-qemu"


def sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def make_home(base: Path, name: str = FAKE_RECIPE, extra: str = "") -> Path:
    """A KVMLAB_HOME with recipes/<name>.toml (the fake tree's recipe) and patches/."""
    home = Path(base)
    (home / "recipes").mkdir(parents=True, exist_ok=True)
    (home / "patches" / name).mkdir(parents=True, exist_ok=True)
    (home / "patches" / name / "series").write_text("# none\n")
    (home / "recipes" / f"{name}.toml").write_text(
        fake_recipe_toml(name, "fake.tar.gz", ["file:///nonexistent/fake.tar.gz"], extra=extra))
    return home


def make_fake_build(settings, recipe, builder: str, work: Path,
                    configured_prefix: str = "/usr/local") -> Path:
    """Build the fake tree natively and lay out settings.out(recipe, builder) like
    kvmlab.build.qemu.

    Returns the out dir. The tree is kept (manifest build_dir) for make-install.
    """
    src = write_fake_qemu_tree(Path(work) / "build-tree")
    build_fake_qemu_native(src, prefix=configured_prefix)
    out = settings.out(recipe.name, builder)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bin").mkdir(exist_ok=True)
    (out / "pc-bios").mkdir(exist_ok=True)
    artifacts = []
    for kind, key in (("binary", "binaries"), ("firmware", "firmware"),
                      ("option_rom", "option_roms")):
        for rel in recipe.artifacts[key]:
            srcf = src / rel
            sub = "bin" if kind == "binary" else "pc-bios"
            dest = out / sub / os.path.basename(rel)
            shutil.copy2(srcf, dest)
            st = dest.stat()
            artifacts.append({"path": f"{sub}/{dest.name}", "kind": kind, "sha256": sha(dest),
                              "size": st.st_size, "mode": f"{stat.S_IMODE(st.st_mode):04o}"})
    manifest = {
        "recipe": recipe.name, "recipe_sha256": recipe.sha256, "builder": builder,
        "image_id": None, "source_sha256": "0" * 64, "patches": [],
        "configure_args": ["./configure", f"--prefix={configured_prefix}"],
        "compiler": "cc (host)",
        "config": {"prefix": configured_prefix, "datadir": f"{configured_prefix}/share/qemu"},
        "artifacts": artifacts, "build_dir": str(src),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def tree_state(root: Path) -> dict[str, tuple]:
    """Every entry under root: path -> (type, sha256 or link target, mode, uid, gid[, inode,
    mtime]) -- files keep their inode and mtime when a backup is put back."""
    root = Path(root)
    state: dict[str, tuple] = {}
    if not root.exists():
        return state
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                state[rel] = ("link", os.readlink(p), 0, st.st_uid, st.st_gid)
            elif stat.S_ISDIR(st.st_mode):
                state[rel] = ("dir", "", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
            else:
                state[rel] = ("file", sha(p), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                              st.st_ino, st.st_mtime_ns)
    return state
