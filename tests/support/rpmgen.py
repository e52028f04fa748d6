"""Write source RPMs for tests, byte by byte (no rpm tools): lead, signature, header, cpio payload.

The layout follows the RPM file format (lead of 96 bytes, header structures with magic
8e ad e8 01, index entries sorted by tag, signature header padded to 8 bytes) and a newc cpio
payload compressed with gzip, xz, bzip2 or zstd (zstd only through the `zstd` program).
"""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import shutil
import stat
import struct
import subprocess
import tarfile
from pathlib import Path

T_INT32, T_STRING, T_BIN, T_STRING_ARRAY = 4, 6, 7, 8
HEADER_MAGIC = b"\x8e\xad\xe8\x01"


def _header(entries: list[tuple[int, int, object]]) -> bytes:
    index, store = b"", b""
    for tag, typ, value in sorted(entries, key=lambda e: e[0]):
        if typ == T_INT32:
            store += b"\0" * (-len(store) % 4)
            vals = value if isinstance(value, list) else [value]
            off, data, count = len(store), b"".join(struct.pack(">I", v) for v in vals), len(vals)
        elif typ == T_STRING:
            off, data, count = len(store), str(value).encode() + b"\0", 1
        elif typ == T_STRING_ARRAY:
            items = list(value)  # type: ignore[call-overload]
            data = b"".join(str(v).encode() + b"\0" for v in items)
            off, count = len(store), len(items)
        else:
            off, data, count = len(store), bytes(value), len(bytes(value))  # type: ignore[arg-type]
        store += data
        index += struct.pack(">iIiI", tag, typ, off, count)
    return HEADER_MAGIC + b"\0" * 4 + struct.pack(">II", len(entries), len(store)) + index + store


def cpio_newc(members: list[tuple[str, bytes | str, int]]) -> bytes:
    """A newc archive of (name, data, mode) members; for symlinks data is the target."""
    out = io.BytesIO()

    def entry(name: str, data: bytes, mode: int, ino: int) -> None:
        nb = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0]
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        out.write(hdr + nb + b"\0" * (-(len(hdr) + len(nb)) % 4))
        out.write(data + b"\0" * (-len(data) % 4))

    for i, (name, data, mode) in enumerate(members, 1):
        entry(name, data.encode() if isinstance(data, str) else data, mode, i)
    entry("TRAILER!!!", b"", 0, 0)
    return out.getvalue()


def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, mtime=0)
    if how == "xz":
        return lzma.compress(data)
    if how == "bzip2":
        return bz2.compress(data)
    if how == "zstd":
        tool = shutil.which("zstd")
        if not tool:
            raise RuntimeError("zstd program not installed")
        return subprocess.run([tool, "-q", "-c"], input=data, capture_output=True, check=True,
                              timeout=60).stdout
    raise ValueError(how)


def write_rpm(path: Path, *, name: str, version: str, release: str,
              members: list[tuple[str, bytes | str, int]], compressor: str = "gzip",
              source: bool = True) -> Path:
    """Write an RPM whose payload holds members (name, data, mode)."""
    lead = struct.pack(">4sBBhh66shh16s", b"\xed\xab\xee\xdb", 3, 0, 1 if source else 0, 1,
                       f"{name}-{version}-{release}".encode()[:65], 1, 5, b"")
    assert len(lead) == 96
    archive = cpio_newc(members)
    payload = compress(archive, compressor)
    hdr_entries: list[tuple[int, int, object]] = [
        (1000, T_STRING, name), (1001, T_STRING, version), (1002, T_STRING, release),
        (1124, T_STRING, "cpio"), (1125, T_STRING, compressor),
        (1117, T_STRING_ARRAY, [m[0] for m in members]),
        (1046, T_INT32, len(archive)),  # RPMTAG_ARCHIVESIZE: rpm2cpio checks what it copied
    ]
    if source:
        hdr_entries.append((1106, T_INT32, 1))  # RPMTAG_SOURCEPACKAGE
    header = _header(hdr_entries)
    sig = _header([(1000, T_INT32, len(header) + len(payload))])  # RPMSIGTAG_SIZE
    sig += b"\0" * (-len(sig) % 8)
    path.write_bytes(lead + sig + header + payload)
    return path


def tarball(files: dict[str, str], top: str) -> bytes:
    """A .tar.gz with files under top/ (deterministic)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        d = tarfile.TarInfo(top)
        d.type, d.mode = tarfile.DIRTYPE, 0o755
        tf.addfile(d)
        for rel, text in files.items():
            data = text.encode()
            ti = tarfile.TarInfo(f"{top}/{rel}")
            ti.size, ti.mode = len(data), 0o644
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def write_srpm(path: Path, spec: str, files: dict[str, bytes | str], *, name: str = "demo",
               version: str = "1.0", release: str = "1", compressor: str = "gzip") -> Path:
    """A source RPM holding NAME.spec plus files (tarballs, patches)."""
    members = [(f"{name}.spec", spec, stat.S_IFREG | 0o644)]
    members += [(n, d, stat.S_IFREG | 0o644) for n, d in files.items()]
    return write_rpm(path, name=name, version=version, release=release, members=members,
                     compressor=compressor)
