"""An uncompressed "newc" cpio archive writer: what the kernel unpacks as an initramfs.

``CpioWriter(f)`` writes entries (``add_dir``, ``add_file``, ``add_symlink``, ``add_node``,
``add_tar_member``) and ``close()`` writes the ``TRAILER!!!`` entry. Every entry has its own
inode number and nlink 1 (hard links of a tar become copies: the kernel does not need them).
``read_newc`` reads such an archive back (used by the tests and for inspection).
"""
from __future__ import annotations

import stat
import tarfile
from dataclasses import dataclass
from typing import IO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
COPY_CHUNK = 1 << 20


def _pad(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


@dataclass(frozen=True)
class Entry:
    name: str
    mode: int
    data: bytes
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    rdev: tuple[int, int] = (0, 0)


class CpioWriter:
    """Streams newc entries into a binary file object."""

    def __init__(self, f: IO[bytes]):
        self.f = f
        self.ino = 1
        self.names: set[str] = set()

    def _header(self, name: str, mode: int, size: int, uid: int, gid: int, mtime: int,
                rdev: tuple[int, int] = (0, 0)) -> None:
        raw = name.encode() + b"\0"
        fields = (self.ino, mode, uid, gid, 1, mtime, size, 0, 0, rdev[0], rdev[1], len(raw), 0)
        hdr = MAGIC + b"".join(b"%08X" % v for v in fields)
        self.f.write(hdr + raw + _pad(len(hdr) + len(raw)))
        self.ino += 1
        self.names.add(name)

    def add_dir(self, name: str, mode: int = 0o755, mtime: int = 0) -> None:
        self._header(name, stat.S_IFDIR | mode, 0, 0, 0, mtime)

    def add_file(self, name: str, data: bytes, mode: int = 0o644, mtime: int = 0) -> None:
        self._header(name, stat.S_IFREG | mode, len(data), 0, 0, mtime)
        self.f.write(data + _pad(len(data)))

    def add_stream(self, name: str, src: IO[bytes], size: int, mode: int, uid: int = 0,
                   gid: int = 0, mtime: int = 0) -> None:
        self._header(name, stat.S_IFREG | mode, size, uid, gid, mtime)
        left = size
        while left:
            chunk = src.read(min(COPY_CHUNK, left))
            if not chunk:
                raise ValueError(f"{name}: short read ({size - left} of {size} bytes)")
            self.f.write(chunk)
            left -= len(chunk)
        self.f.write(_pad(size))

    def add_symlink(self, name: str, target: str, mtime: int = 0) -> None:
        data = target.encode()
        self._header(name, stat.S_IFLNK | 0o777, len(data), 0, 0, mtime)
        self.f.write(data + _pad(len(data)))

    def add_node(self, name: str, mode: int, rdev: tuple[int, int], mtime: int = 0) -> None:
        """A device node or fifo (mode includes S_IFCHR / S_IFBLK / S_IFIFO)."""
        self._header(name, mode, 0, 0, 0, mtime, rdev)

    def add_tar_member(self, tar: tarfile.TarFile, m: tarfile.TarInfo, name: str) -> None:
        """Copy one member of a (seekable) tar; hard links become copies of their target."""
        perm = m.mode & 0o7777
        if m.isdir():
            self._header(name, stat.S_IFDIR | perm, 0, m.uid, m.gid, int(m.mtime))
        elif m.issym():
            data = m.linkname.encode()
            self._header(name, stat.S_IFLNK | 0o777, len(data), m.uid, m.gid, int(m.mtime))
            self.f.write(data + _pad(len(data)))
        elif m.isfile() or m.islnk():
            src = tar.extractfile(m)
            if src is None:
                return
            target = tar.getmember(m.linkname) if m.islnk() else m
            self.add_stream(name, src, target.size, perm, m.uid, m.gid, int(m.mtime))
        elif m.ischr() or m.isblk() or m.isfifo():
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK if m.isblk() else stat.S_IFIFO
            self._header(name, kind | perm, 0, m.uid, m.gid, int(m.mtime),
                         (m.devmajor, m.devminor))

    def close(self) -> None:
        self._header(TRAILER, 0, 0, 0, 0, 0)
        self.f.flush()


def read_newc(data: bytes) -> list[Entry]:
    """The entries of a newc archive (up to the trailer)."""
    out: list[Entry] = []
    pos = 0
    while True:
        if data[pos:pos + 6] != MAGIC:
            raise ValueError(f"not a newc header at offset {pos}")
        v = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, uid, gid, mtime, size, namesize = v[1], v[2], v[3], v[5], v[6], v[11]
        npos = pos + 110
        name = data[npos:npos + namesize - 1].decode()
        dpos = npos + namesize + len(_pad(110 + namesize))
        if name == TRAILER:
            return out
        out.append(Entry(name, mode, data[dpos:dpos + size], uid, gid, mtime, (v[9], v[10])))
        pos = dpos + size + len(_pad(size))
