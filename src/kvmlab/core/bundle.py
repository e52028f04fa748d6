"""kvmlab's own code as a bundle for another machine (a remote lab host, the nested lab VM).

``make_bundle`` makes a tar.gz with ``lib/`` (kvmlab from this checkout and the Python packages it
imports, copied from this interpreter's installation as files, so extension modules work, unlike
a zipapp), ``recipes/`` and ``patches/``. Unpacked anywhere, ``PYTHONPATH=<dir>/lib python3 -m
kvmlab ...`` runs the same code there.
"""
from __future__ import annotations

import io
import re
import tarfile
from importlib import metadata
from pathlib import Path

import kvmlab
from kvmlab.core.settings import Settings

# controller-only packages (ssh client side) are not shipped to the hosts
CONTROLLER_ONLY = {"fabric", "paramiko"}



def _closure(dist_name: str) -> list[metadata.Distribution]:
    seen: dict[str, metadata.Distribution] = {}
    todo = [dist_name]
    while todo:
        name = re.split(r"[\s<>=!~;\[(]", todo.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if name in seen or name in CONTROLLER_ONLY:
            continue
        try:
            d = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[name] = d
        for req in d.requires or []:
            if "extra ==" in req:
                continue
            todo.append(req)
    return list(seen.values())


def _top_levels(d: metadata.Distribution) -> set[str]:
    tops: set[str] = set()
    for f in d.files or []:
        first = f.parts[0]
        if first.endswith((".dist-info", ".egg-info", ".pth")) or first in ("..", "__pycache__"):
            continue
        if len(f.parts) == 1 and not first.endswith((".py", ".so")):
            continue
        tops.add(first)
    return tops


def make_bundle(settings: Settings) -> bytes:
    """A tar.gz: lib/<packages>, recipes/, patches/ (kvmlab from this checkout)."""
    buf = io.BytesIO()
    skip = lambda ti: None if "__pycache__" in ti.name or ti.name.endswith(".pyc") else ti  # noqa: E731
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        tar.add(Path(kvmlab.__file__).parent, "lib/kvmlab", filter=skip)
        for d in _closure("kvmlab"):
            if d.metadata["Name"].lower() == "kvmlab":
                continue
            for top in sorted(_top_levels(d)):
                src = Path(str(d.locate_file(top)))
                if src.exists():
                    tar.add(src, f"lib/{top}", filter=skip)
        tar.add(settings.recipes_dir, "recipes", filter=skip)
        if settings.patches_dir.is_dir():
            tar.add(settings.patches_dir, "patches", filter=skip)
    return buf.getvalue()
