"""Disk images: create one with qemu-img, safely, and confirm what was made.

``create_image`` refuses to overwrite an existing file without ``force`` (the file is left
untouched), checks the free space of the target file system first, creates the image under a
temporary name in the same directory and renames it into place only after ``qemu-img info`` has
confirmed its format and virtual size. Works with qemu-img from qemu-kvm 0.12 (no
``--output=json``: its text output is parsed) and with current releases.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from kvmlab.core import proc
from kvmlab.core.errors import ImageError, KvmlabError
from kvmlab.core.settings import Settings
from kvmlab.install.txn import installed_qemu
from kvmlab.qemu.binary import path_or_distro

FORMATS = ("qcow2", "raw")
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# qcow2 needs its header, L1 table and refcount blocks up front: far below 1 MiB for any size
# this tool creates; the check keeps a margin for the temp file and metadata of other writers.
QCOW2_OVERHEAD = 4 << 20
QEMU_IMG_TIMEOUT = 60


@dataclass(frozen=True)
class ImageInfo:
    path: Path
    format: str
    virtual_size: int
    compat: str = ""  # qcow2: "0.10" (v2, readable by qemu-kvm 0.12) or "1.1" (v3)


@dataclass(frozen=True)
class ImageResult:
    path: Path
    format: str
    virtual_size: int
    qemu_img: Path


def parse_size(size: str | int) -> int:
    """'10G', '512M', '1048576' (bytes) -> bytes. Binary units, like qemu-img."""
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([KMGTB]?)(?:I?B)?\s*", str(size), re.IGNORECASE)
        if not m:
            raise ImageError(f"not a size: {size!r}",
                             hint="use a number with K, M, G or T, e.g. 10G")
        n = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if n <= 0:
        raise ImageError(f"image size must be positive, not {size!r}")
    if n % 512:
        raise ImageError(f"image size {n} is not a multiple of 512 bytes",
                         hint="disks are made of 512-byte sectors; use K, M or G units")
    return n


def human_size(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return f"{n}B"


def find_qemu_img(settings: Settings | None = None, qemu_img: str | Path | None = None,
                  near: str | Path | None = None) -> Path:
    """The qemu-img to use: explicit > next to ``near`` (a qemu binary) > installed > PATH >
    the distribution's (qemu-utils, when PATH has none)."""
    if qemu_img:
        p = Path(qemu_img)
        if not p.exists():
            found = shutil.which(str(qemu_img))
            if not found:
                raise ImageError(f"qemu-img not found: {qemu_img}",
                                 hint="give the path of a qemu-img binary, or install qemu-utils")
            p = Path(found)
        return p
    candidates: list[Path] = []
    if near:
        candidates.append(Path(near).resolve().parent / "qemu-img")
    if settings is not None:
        try:
            q = installed_qemu(settings)
            if q:
                candidates.append(Path(q).parent / "qemu-img")
        except (KvmlabError, OSError, ValueError, KeyError, TypeError):  # no readable manifest
            pass
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    on_host = path_or_distro("qemu-img")
    if on_host:
        return on_host
    raise ImageError("qemu-img not found (no installed build, not on PATH, no qemu-utils)",
                     hint="run `invoke install`, install Debian's qemu-utils, or pass --qemu-img")


def qemu_img_version(qemu_img: str | Path) -> tuple[int, int]:
    """(major, minor) from `qemu-img --help` (0.12 has no --version); (0, 0) if unknown."""
    r = _run([str(qemu_img), "--help"])
    m = re.search(r"qemu-img version (\d+)\.(\d+)", r.stdout + r.stderr)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _run(cmd: list[str], timeout: float = QEMU_IMG_TIMEOUT) -> proc.CompletedProcess:
    """qemu-img (via kvmlab.core.proc); every way it cannot run is an ImageError."""
    try:
        return proc.run(cmd, timeout=timeout)
    except proc.CommandTimeout:
        raise ImageError(f"{Path(cmd[0]).name} {cmd[1]} did not finish in {timeout:.0f} s"
                         ) from None
    except KvmlabError as e:  # not installed, permission denied
        raise ImageError(e.message, hint=e.hint) from None
    except OSError as e:
        raise ImageError(f"cannot run {cmd[0]}: {e.strerror}") from None


def parse_info_text(text: str) -> tuple[str, int]:
    """Parse `qemu-img info` text output (the only output of 0.12's qemu-img).

    0.12:  'file format: qcow2' / 'virtual size: 10G (10737418240 bytes)'
    7.2:   'file format: qcow2' / 'virtual size: 10 GiB (10737418240 bytes)'
    """
    fm = re.search(r"^file format:\s*(\S+)", text, re.MULTILINE)
    sm = re.search(r"^virtual size:.*\((\d+) bytes\)", text, re.MULTILINE)
    if not fm or not sm:
        raise ImageError("cannot read `qemu-img info` output",
                         hint="first lines were: " + " | ".join(text.splitlines()[:3]))
    return fm.group(1), int(sm.group(1))


def image_info(path: str | Path, qemu_img: str | Path | None = None) -> ImageInfo:
    """Format and virtual size of an image, from `qemu-img info` (JSON when supported)."""
    qi = str(qemu_img or find_qemu_img())
    path = Path(path)
    r = _run([qi, "info", "--output=json", str(path)])
    if r.returncode == 0 and r.stdout.lstrip().startswith("{"):
        data = json.loads(r.stdout)
        compat = str(((data.get("format-specific") or {}).get("data") or {}).get("compat", ""))
        return ImageInfo(path, data["format"], int(data["virtual-size"]), compat)
    r = _run([qi, "info", str(path)])
    if r.returncode != 0:
        raise ImageError(f"qemu-img info {path} failed: {(r.stderr or r.stdout).strip()[:300]}")
    return parse_info(r.stdout, path)


def parse_info(text: str, path: str | Path) -> ImageInfo:
    """ImageInfo from `qemu-img info PATH` text output, of any qemu-img from 0.12 on (the checks
    of create-image / boot-test read the image this way with the qemu-img that made it)."""
    fmt, size = parse_info_text(text)
    cm = re.search(r"^\s*compat:\s*(\S+)", text, re.MULTILINE)
    # 0.12's qemu-img knows only qcow2 v2 and prints no compat line
    compat = cm.group(1) if cm else ("0.10" if fmt == "qcow2" else "")
    return ImageInfo(Path(path), fmt, size, compat)


def qcow2_version(path: str | Path) -> int | None:
    """2 or 3 when the file is a qcow2 image (header magic 'QFI\\xfb'), else None.

    Read directly: qemu-img 0.12 does not know qcow2 v3 and probes such an image as *raw*.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return None
    if len(head) == 8 and head[:4] == b"QFI\xfb":
        return int.from_bytes(head[4:8], "big")
    return None


def create_image(path: str | Path, size: str | int, fmt: str = "qcow2",
                 qemu_img: str | Path | None = None, force: bool = False,
                 settings: Settings | None = None,
                 options: list[str] | None = None) -> ImageResult:
    """Create a disk image at ``path``; see the module docstring for the guarantees.

    ``options``: extra ``-o`` values for qemu-img create (e.g. ``compat=0.10``: a qcow2 that
    qemu-kvm 0.12 can open, when a newer qemu-img makes it).
    """
    if fmt not in FORMATS:
        raise ImageError(f"unsupported image format {fmt!r}",
                         hint="use one of " + ", ".join(FORMATS))
    nbytes = parse_size(size)
    path = Path(path).expanduser().absolute()
    if path.exists() or path.is_symlink():
        if not force:
            raise ImageError(f"{path} already exists; not overwriting it",
                             hint="pass --force to replace it, or choose another path")
        if path.is_dir():
            raise ImageError(f"{path} is a directory")
    parent = path.parent
    if not parent.is_dir():
        raise ImageError(f"directory {parent} does not exist", hint="create it first")
    need = nbytes if fmt == "raw" else QCOW2_OVERHEAD
    free = shutil.disk_usage(parent).free
    if free < need:
        raise ImageError(f"not enough free space in {parent}: {human_size(free)} free, "
                         f"{fmt} image of {human_size(nbytes)} needs about {human_size(need)}",
                         hint="free some space, choose another directory or use qcow2")
    qi = find_qemu_img(settings, qemu_img)
    tmp = parent / f".{path.name}.kvmlab-tmp-{os.getpid()}"
    try:
        opts = ["-o", ",".join(options)] if options else []
        r = _run([str(qi), "create", "-f", fmt, *opts, str(tmp), str(nbytes)])
        if r.returncode != 0 or not tmp.exists():
            raise ImageError(f"qemu-img create failed: {(r.stderr or r.stdout).strip()[:300]}",
                             hint=f"qemu-img used: {qi}")
        info = image_info(tmp, qi)
        if info.format != fmt or info.virtual_size != nbytes:
            raise ImageError(f"qemu-img made a {info.format} image of {info.virtual_size} bytes, "
                             f"expected {fmt} of {nbytes}", hint=f"qemu-img used: {qi}")
        if force:
            os.replace(tmp, path)
        else:
            try:  # no-clobber rename: fails if someone created the path meanwhile
                os.link(tmp, path)
            except FileExistsError:
                raise ImageError(f"{path} appeared while creating the image; not overwriting it",
                                 hint="pass --force to replace it") from None
            except OSError:  # file system without hard links: best-effort check + rename
                if path.exists():
                    raise ImageError(f"{path} appeared while creating the image") from None
                os.replace(tmp, path)
            else:
                tmp.unlink()
    finally:
        if tmp.exists():
            tmp.unlink()
    return ImageResult(path, fmt, nbytes, qi)
