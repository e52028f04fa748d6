"""srpm: read a source RPM without rpm installed: lead, headers and the cpio payload.

A ``.src.rpm`` is read by hand: the 96-byte lead, the signature header (padded to 8 bytes), the
main header (NAME, VERSION, RELEASE, PAYLOADFORMAT, PAYLOADCOMPRESSOR) and the payload, a newc
cpio archive compressed with gzip, xz, lzma, bzip2 (all stdlib) or zstd (the ``zstd`` program or
the ``zstandard`` module when installed). Only when the payload cannot be read that way (zstd with
neither, or an unknown compressor) is ``rpm2cpio`` used, if present.

cpio extraction is confined to the destination: absolute names, ``..`` components, device files,
FIFOs, and symbolic links whose target leaves the tree are refused, files are created with
O_EXCL|O_NOFOLLOW below a parent that must resolve inside the destination, setuid/setgid/sticky
and group/other write bits are dropped.

The spec inside is read by kvmlab.source.spec; kvmlab.source.unpack makes the patched tree.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from kvmlab.core import proc
from kvmlab.core.errors import UnpackError

LEAD_SIZE = 96
LEAD_MAGIC = b"\xed\xab\xee\xdb"
HEADER_MAGIC = b"\x8e\xad\xe8\x01"
CPIO_MAGICS = (b"070701", b"070702")  # newc, newc with crc
CPIO_HEADER = 110
CPIO_TRAILER = "TRAILER!!!"
TOOL_TIMEOUT = 600

# header tags used here
TAG_NAME, TAG_VERSION, TAG_RELEASE = 1000, 1001, 1002
TAG_SOURCEPACKAGE = 1106
TAG_PAYLOADFORMAT, TAG_PAYLOADCOMPRESSOR = 1124, 1125
# header data types
(T_NULL, T_CHAR, T_INT8, T_INT16, T_INT32, T_INT64, T_STRING, T_BIN, T_STRING_ARRAY,
 T_I18N) = range(10)
_INT_FMT = {T_CHAR: ("B", 1), T_INT8: ("B", 1), T_INT16: (">H", 2), T_INT32: (">I", 4),
            T_INT64: (">Q", 8)}


class SrpmError(UnpackError):
    """A source RPM is unreadable, unsafe, or its %prep cannot be reproduced."""


# -- the RPM container ----------------------------------------------------------------------------

@dataclass(frozen=True)
class RpmInfo:
    path: Path
    is_source: bool
    name: str
    version: str
    release: str
    payload_format: str
    compressor: str
    payload_offset: int
    tags: dict[int, Any] = field(repr=False)


def is_srpm(path: Path) -> bool:
    """True when path is an RPM file whose lead says "source package"."""
    try:
        with open(path, "rb") as f:
            lead = f.read(LEAD_SIZE)
    except OSError:
        return False
    return (len(lead) == LEAD_SIZE and lead[:4] == LEAD_MAGIC
            and struct.unpack(">H", lead[6:8])[0] == 1)


def _read_exact(f: IO[bytes], n: int, what: str, label: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise SrpmError(f"{label}: truncated RPM file (short read in the {what})",
                        hint="the download may be incomplete: fetch it again (--force)")
    return data


def _read_header(f: IO[bytes], label: str, what: str) -> dict[int, Any]:
    intro = _read_exact(f, 16, what, label)
    if intro[:4] != HEADER_MAGIC:
        raise SrpmError(f"{label}: bad RPM {what} magic {intro[:4].hex()}",
                        hint="not an RPM file, or a damaged one")
    nindex, hsize = struct.unpack(">II", intro[8:16])
    if nindex > 100_000 or hsize > 256 << 20:
        raise SrpmError(f"{label}: implausible RPM {what} size ({nindex} entries, {hsize} bytes)")
    index = _read_exact(f, 16 * nindex, what, label)
    store = _read_exact(f, hsize, what, label)
    tags: dict[int, Any] = {}
    for i in range(nindex):
        tag, typ, off, count = struct.unpack(">iIiI", index[16 * i:16 * i + 16])
        if off < 0 or off > hsize:
            raise SrpmError(f"{label}: RPM {what} entry {tag} points outside the header")
        try:
            if typ == T_STRING:
                tags[tag] = store[off:store.index(b"\0", off)].decode("utf-8", "replace")
            elif typ in (T_STRING_ARRAY, T_I18N):
                vals, pos = [], off
                for _ in range(count):
                    end = store.index(b"\0", pos)
                    vals.append(store[pos:end].decode("utf-8", "replace"))
                    pos = end + 1
                tags[tag] = vals
            elif typ == T_BIN:
                tags[tag] = store[off:off + count]
            elif typ in _INT_FMT:
                fmt, size = _INT_FMT[typ]
                tags[tag] = [struct.unpack(fmt, store[off + k * size:off + (k + 1) * size])[0]
                             for k in range(count)]
        except (ValueError, struct.error):
            raise SrpmError(f"{label}: RPM {what} entry {tag} is malformed") from None
    return tags


def _read_lead_and_headers(f: IO[bytes], label: str) -> tuple[bytes, dict[int, Any], int]:
    """(lead, main header tags, payload offset)."""
    lead = _read_exact(f, LEAD_SIZE, "lead", label)
    if lead[:4] != LEAD_MAGIC:
        raise SrpmError(f"{label}: not an RPM file (no RPM lead magic)",
                        hint="a source of format \"srpm\" must be a .src.rpm file; give a "
                             "tarball or directory of an already patched tree with --source")
    _read_header(f, label, "signature")
    pos = f.tell()
    f.seek((pos + 7) // 8 * 8)  # the signature header is padded to 8 bytes
    tags = _read_header(f, label, "header")
    return lead, tags, f.tell()


def read_rpm(path: Path) -> RpmInfo:
    """Parse the lead, signature and header of an RPM; the payload starts at payload_offset."""
    label = Path(path).name
    try:
        with open(path, "rb") as f:
            lead, tags, offset = _read_lead_and_headers(f, label)
    except OSError as e:
        raise SrpmError(f"cannot read {path}: {e.strerror}") from None

    def s(tag: int, default: str = "") -> str:
        v = tags.get(tag, default)
        return v if isinstance(v, str) else default

    is_source = struct.unpack(">H", lead[6:8])[0] == 1 or TAG_SOURCEPACKAGE in tags
    return RpmInfo(Path(path), is_source, s(TAG_NAME), s(TAG_VERSION), s(TAG_RELEASE),
                   s(TAG_PAYLOADFORMAT, "cpio"), s(TAG_PAYLOADCOMPRESSOR, "gzip"), offset, tags)


def _stdlib_stream(comp: str, f: IO[bytes]) -> IO[bytes] | None:
    """A decompressing reader over f for the compressors Python has; None for the others."""
    if comp == "gzip":
        return gzip.GzipFile(fileobj=f, mode="rb")  # type: ignore[return-value]  # GzipFile is an IO[bytes]
    if comp == "xz":
        return lzma.LZMAFile(f, "rb")
    if comp == "lzma":
        return lzma.LZMAFile(f, "rb", format=lzma.FORMAT_ALONE)
    if comp == "bzip2":
        return bz2.BZ2File(f, "rb")
    return None


def _zstd_stream(f: IO[bytes]) -> tuple[IO[bytes], proc.Popen | None]:
    """The zstandard module when installed (optional, not a dependency), else ``zstd -dc``."""
    try:
        import zstandard  # optional third-party package, imported only when a payload needs it
        return zstandard.ZstdDecompressor().stream_reader(f), None
    except ImportError:
        tool = shutil.which("zstd")
        if not tool:
            raise _NoDecompressor("zstd") from None
        child = proc.spawn([tool, "-dc"], stdin=f, stdout=proc.PIPE)
        return child.stdout, child  # type: ignore[return-value]


def _drain(child: proc.Popen, what: str) -> None:
    """Read a decompressor's output to its end (the padding after the cpio trailer) and check
    that it exited 0."""
    while child.stdout.read(1 << 16):  # type: ignore[union-attr]
        pass
    child.stdout.close()  # type: ignore[union-attr]
    err = child.stderr.read().decode(errors="replace").strip() if child.stderr else ""
    if child.wait(timeout=TOOL_TIMEOUT) != 0:
        raise SrpmError(f"{what} failed" + (f": {err}" if err else ""))


@contextmanager
def _payload(info: RpmInfo) -> Iterator[IO[bytes]]:
    """The decompressed payload (a cpio stream); _NoDecompressor when none is available."""
    comp = info.compressor
    child: proc.Popen | None = None
    with open(info.path, "rb") as f:
        try:
            f.seek(info.payload_offset)
            stream = _stdlib_stream(comp, f)
            if stream is None and comp == "zstd":
                stream, child = _zstd_stream(f)
            if stream is None:
                raise _NoDecompressor(comp)
            yield stream
            if child is not None:
                _drain(child, f"{info.path.name}: zstd -dc on the payload")
        except (OSError, EOFError, lzma.LZMAError, ValueError) as e:
            raise SrpmError(f"{info.path.name}: cannot decompress the {comp} payload: {e}",
                            hint="the file may be damaged: fetch it again (--force)") from None
        finally:
            if child is not None:
                proc.kill_group(child)


class _NoDecompressor(Exception):
    pass


# -- cpio -----------------------------------------------------------------------------------------

def _safe_name(name: str, label: str) -> str:
    n = name[2:] if name.startswith("./") else name
    p = PurePosixPath(n)
    if name.startswith("/") or not n or ".." in p.parts or "\0" in n:
        raise SrpmError(f"{label}: refusing cpio member {name!r} (absolute path or '..')",
                        hint="the archive would write outside the destination; get the source "
                             "RPM from a trusted place")
    return str(p)


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root + os.sep)


class _Cpio:
    """A newc cpio stream being extracted below root (see extract_cpio)."""

    def __init__(self, stream: IO[bytes], dest: Path, label: str):
        self.stream, self.label = stream, label
        self.root = os.path.realpath(dest)
        self.names: list[str] = []
        self.pending_links: dict[tuple[int, int], list[str]] = {}  # hard links awaiting data

    def read(self, n: int, what: str) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.stream.read(n - len(data))
            if not chunk:
                raise SrpmError(f"{self.label}: truncated cpio archive ({what})")
            data += chunk
        return data

    def target(self, rel: str) -> str:
        """The member's path, after creating its parent, which must resolve inside root."""
        target = os.path.join(self.root, rel)
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        if not _inside(self.root, os.path.realpath(parent)):
            raise SrpmError(f"{self.label}: refusing cpio member {rel!r}: its directory leads "
                            "outside the destination through a link")
        return target

    def header(self) -> tuple[str, list[int]]:
        """(member name, the 13 header fields)."""
        hdr = self.read(CPIO_HEADER, "header")
        if hdr[:6] not in CPIO_MAGICS:
            raise SrpmError(f"{self.label}: not a newc cpio archive (magic {hdr[:6]!r})",
                            hint="only the 'newc' cpio format (rpm's) is supported")
        try:
            fields = [int(hdr[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise SrpmError(f"{self.label}: corrupt cpio header") from None
        namesize = fields[11]
        raw = self.read(namesize, "name")
        self.read((4 - (CPIO_HEADER + namesize) % 4) % 4, "padding")
        return raw.rstrip(b"\0").decode("utf-8", "surrogateescape"), fields

    def member(self, name: str, fields: list[int]) -> None:
        ino, mode, nlink, size, dmaj = fields[0], fields[1], fields[4], fields[6], fields[7]
        pad = (4 - size % 4) % 4
        rel = _safe_name(name, self.label)
        kind = stat.S_IFMT(mode)
        if rel == ".":
            self.read(size + pad, "data")
            return
        if kind == stat.S_IFDIR:
            self.read(size + pad, "data")
            self.directory(rel, mode & 0o755)
        elif kind == stat.S_IFLNK:
            link = self.read(size, "link").decode("utf-8", "surrogateescape")
            self.read(pad, "padding")
            self.symlink(rel, link)
        elif kind == stat.S_IFREG:
            self.regular(rel, mode & 0o755, size, (dmaj, ino), nlink)
            self.read(pad, "padding")
        else:
            raise SrpmError(f"{self.label}: refusing cpio member {rel!r}: special file "
                            f"(mode {mode:o})", hint="source RPMs hold regular files only")
        self.names.append(rel)

    def directory(self, rel: str, perm: int) -> None:
        target = self.target(rel)
        if os.path.islink(target):
            raise SrpmError(f"{self.label}: refusing cpio directory {rel!r} over a link")
        os.makedirs(target, exist_ok=True)
        os.chmod(target, perm | 0o700)

    def symlink(self, rel: str, link: str) -> None:
        resolved = os.path.normpath(os.path.join(os.path.dirname(rel), link))
        if link.startswith("/") or resolved == ".." or resolved.startswith("../"):
            raise SrpmError(f"{self.label}: refusing cpio member {rel!r}: a link to {link!r}, "
                            "outside the destination",
                            hint="get the source RPM from a trusted place")
        os.symlink(link, self.target(rel))

    def regular(self, rel: str, perm: int, size: int, key: tuple[int, int], nlink: int) -> None:
        target = self.target(rel)
        if nlink > 1 and size == 0:
            self.pending_links.setdefault(key, []).append(target)  # data comes with the last link
            return
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, perm)
        except FileExistsError:
            raise SrpmError(f"{self.label}: cpio member {rel!r} occurs twice") from None
        with os.fdopen(fd, "wb") as out:
            left = size
            while left:
                chunk = self.stream.read(min(left, 1 << 20))
                if not chunk:
                    raise SrpmError(f"{self.label}: truncated cpio archive (data of {rel!r})")
                out.write(chunk)
                left -= len(chunk)
        for other in self.pending_links.pop(key, []):
            os.link(target, other)

    def finish(self) -> None:
        for others in self.pending_links.values():  # hard links whose data never came: empty
            for other in others:
                os.close(os.open(other, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                                 0o644))


def extract_cpio(stream: IO[bytes], dest: Path, label: str = "cpio") -> list[str]:
    """Extract a newc cpio stream into the existing directory dest; return the member names."""
    cpio = _Cpio(stream, dest, label)
    while True:
        name, fields = cpio.header()
        if name == CPIO_TRAILER:
            break
        cpio.member(name, fields)
    cpio.finish()
    return cpio.names


def extract_rpm(path: Path, dest: Path) -> tuple[RpmInfo, list[str]]:
    """Extract an RPM's payload into the new directory dest (Python reader; rpm2cpio fallback)."""
    info = read_rpm(path)
    if info.payload_format not in ("cpio", ""):
        raise SrpmError(f"{path.name}: payload format {info.payload_format!r} is not supported",
                        hint="only cpio payloads (every rpm before 6.0's v6 format) are read")
    dest.mkdir(parents=True)
    try:
        with _payload(info) as stream:
            return info, extract_cpio(stream, dest, path.name)
    except _NoDecompressor as e:
        shutil.rmtree(dest)
        dest.mkdir()
        return info, _extract_with_rpm2cpio(path, dest, str(e))


def _extract_with_rpm2cpio(path: Path, dest: Path, compressor: str) -> list[str]:
    tool = shutil.which("rpm2cpio")
    if not tool:
        raise SrpmError(f"{path.name}: the payload is compressed with {compressor!r}, which "
                        "neither Python nor an installed tool can decompress",
                        hint="apt-get install zstd (for zstd) or rpm2cpio")
    child = proc.spawn([tool, str(path)], stdout=proc.PIPE, stderr=proc.PIPE)
    try:
        names = extract_cpio(child.stdout, dest, path.name)  # type: ignore[arg-type]
        _drain(child, f"rpm2cpio {path.name}")  # cpio pads its archive after the trailer
        return names
    finally:
        proc.kill_group(child)
