"""srpm: source RPMs as a recipe source (source.format = "srpm"), without rpm installed.

A ``.src.rpm`` is read by hand: the 96-byte lead, the signature header (padded to 8 bytes), the
main header (NAME, VERSION, RELEASE, PAYLOADFORMAT, PAYLOADCOMPRESSOR) and the payload, a newc
cpio archive compressed with gzip, xz, lzma, bzip2 (all stdlib) or zstd (the ``zstd`` program or
the ``zstandard`` module when installed). Only when the payload cannot be read that way (zstd with
neither, or an unknown compressor) is ``rpm2cpio`` used, if present.

cpio extraction is confined to the destination: absolute names, ``..`` components, device files,
FIFOs, and symbolic links whose target leaves the tree are refused, files are created with
O_EXCL|O_NOFOLLOW below a parent that must resolve inside the destination, setuid/setgid/sticky
and group/other write bits are dropped.

The spec is then read for what %prep does (see :func:`parse_spec`): ``%setup``, ``%patchN -pX``,
``%patch -P N -pX``, ``%patch N``, ``%autosetup -pX`` / ``%autopatch`` (every Patch line, in the
order of declaration), and the RHEL 6 kernel-style ``ApplyPatch FILE [ARGS]`` shell function (its
``-p``/``-F`` levels come from the spec's own ``patch_command='patch ...'`` line). Macros defined
with ``%define``/``%global``/``%bcond_with[out]`` are expanded, ``%if``/``%ifarch`` blocks are
evaluated (arch x86_64), shell substitutions ``%(...)`` are never run (they expand to nothing).

Levels: the spec's own ``-pN``; without one, no ``-p`` is passed (as rpm does; patch(1) then uses
the bare file name). Fuzz: ``%patch`` uses rpm's ``%_default_patch_fuzz``, which is 0 since rpm
4.6 and so on RHEL 6 (rpm 4.8); a spec may override it (``%global _default_patch_fuzz 2``).
``ApplyPatch`` uses the levels of the spec's own patch_command (qemu-kvm's RHEL 6 spec:
``patch -p1 -F1 -s``, i.e. fuzz 1, though it applies its Patch lines with ``%patchN``); without
such a line ``-p1 -F1`` (the RHEL 6 kernel spec's value) is assumed.

Other %prep shell lines are not executed (they are reported as ``ignored``): kvmlab never runs a
downloaded spec's shell code. Only the patch steps are reproduced, with the spec's levels.

:func:`unpack_srpm` makes the patched tree (atomically, like kvmlab.source.tar); the recipe's compat
series (kvmlab.source.patch) is applied on top of it by the pipeline. A plain tree given with --source
(a tarball or directory of an already patched tree, e.g. a git export of the RHEL tree) is not an
SRPM: :func:`is_srpm` tells them apart and only the compat series applies then.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import os
import re
import shlex
import shutil
import stat
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from kvmlab.core.errors import UnpackError
from kvmlab.core.fsutil import replace_dir, sha256_file

LEAD_SIZE = 96
LEAD_MAGIC = b"\xed\xab\xee\xdb"
HEADER_MAGIC = b"\x8e\xad\xe8\x01"
CPIO_MAGICS = (b"070701", b"070702")  # newc, newc with crc
CPIO_HEADER = 110
CPIO_TRAILER = "TRAILER!!!"
RPM_DEFAULT_PATCH_FUZZ = 0     # rpm >= 4.6 (RHEL 6 ships rpm 4.8): %_default_patch_fuzz 0
APPLYPATCH_DEFAULT = ("-p1", "-F1")  # RHEL 6 kernel.spec: patch_command='patch -p1 -F1 -s'
TARGET_ARCH = "x86_64"
PATCH_TIMEOUT = 300
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


def read_rpm(path: Path) -> RpmInfo:
    """Parse the lead, signature and header of an RPM; the payload starts at payload_offset."""
    label = Path(path).name
    try:
        f = open(path, "rb")
    except OSError as e:
        raise SrpmError(f"cannot read {path}: {e.strerror}") from None
    with f:
        lead = _read_exact(f, LEAD_SIZE, "lead", label)
        if lead[:4] != LEAD_MAGIC:
            raise SrpmError(f"{label}: not an RPM file (no RPM lead magic)",
                            hint="a source of format \"srpm\" must be a .src.rpm file; give a "
                                 "tarball or directory of an already patched tree with --source")
        _read_header(f, label, "signature")
        pos = f.tell()
        f.seek((pos + 7) // 8 * 8)  # the signature header is padded to 8 bytes
        tags = _read_header(f, label, "header")
        offset = f.tell()

    def s(tag: int, default: str = "") -> str:
        v = tags.get(tag, default)
        return v if isinstance(v, str) else default

    is_source = struct.unpack(">H", lead[6:8])[0] == 1 or TAG_SOURCEPACKAGE in tags
    return RpmInfo(Path(path), is_source, s(TAG_NAME), s(TAG_VERSION), s(TAG_RELEASE),
                   s(TAG_PAYLOADFORMAT, "cpio"), s(TAG_PAYLOADCOMPRESSOR, "gzip"), offset, tags)


@contextmanager
def _payload(info: RpmInfo) -> Iterator[IO[bytes]]:
    """The decompressed payload (a cpio stream); SrpmError when no decompressor is available."""
    comp = info.compressor
    f = open(info.path, "rb")
    proc: subprocess.Popen[bytes] | None = None
    try:
        f.seek(info.payload_offset)
        if comp == "gzip":
            stream: IO[bytes] = gzip.GzipFile(fileobj=f, mode="rb")  # type: ignore[assignment]
        elif comp == "xz":
            stream = lzma.LZMAFile(f, "rb")  # type: ignore[assignment]
        elif comp == "lzma":
            stream = lzma.LZMAFile(f, "rb", format=lzma.FORMAT_ALONE)  # type: ignore[assignment]
        elif comp == "bzip2":
            stream = bz2.BZ2File(f, "rb")  # type: ignore[assignment]
        elif comp == "zstd":
            try:
                import zstandard  # type: ignore[import-not-found]
                stream = zstandard.ZstdDecompressor().stream_reader(f)
            except ImportError:
                tool = shutil.which("zstd")
                if not tool:
                    raise _NoDecompressor(comp) from None
                proc = subprocess.Popen([tool, "-dc"], stdin=f, stdout=subprocess.PIPE)
                stream = proc.stdout  # type: ignore[assignment]
        else:
            raise _NoDecompressor(comp)
        yield stream
        if proc is not None:
            while proc.stdout.read(1 << 16):  # type: ignore[union-attr]
                pass  # the padding after the cpio trailer
            proc.stdout.close()  # type: ignore[union-attr]
            if proc.wait(timeout=TOOL_TIMEOUT) != 0:
                raise SrpmError(f"{info.path.name}: zstd -dc failed on the payload")
    except (OSError, EOFError, lzma.LZMAError, ValueError) as e:
        raise SrpmError(f"{info.path.name}: cannot decompress the {comp} payload: {e}",
                        hint="the file may be damaged: fetch it again (--force)") from None
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        f.close()


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


def extract_cpio(stream: IO[bytes], dest: Path, label: str = "cpio") -> list[str]:
    """Extract a newc cpio stream into the existing directory dest; return the member names."""
    root = os.path.realpath(dest)
    names: list[str] = []
    pending_links: dict[tuple[int, int], list[str]] = {}

    def read(n: int, what: str) -> bytes:
        data = b""
        while len(data) < n:
            chunk = stream.read(n - len(data))
            if not chunk:
                raise SrpmError(f"{label}: truncated cpio archive ({what})")
            data += chunk
        return data

    def parent_ok(rel: str) -> str:
        target = os.path.join(root, rel)
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        if not _inside(root, os.path.realpath(parent)):
            raise SrpmError(f"{label}: refusing cpio member {rel!r}: its directory leads "
                            "outside the destination through a link")
        return target

    while True:
        hdr = read(CPIO_HEADER, "header")
        if hdr[:6] not in CPIO_MAGICS:
            raise SrpmError(f"{label}: not a newc cpio archive (magic {hdr[:6]!r})",
                            hint="only the 'newc' cpio format (rpm's) is supported")
        try:
            fields = [int(hdr[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise SrpmError(f"{label}: corrupt cpio header") from None
        ino, mode, nlink, size, dmaj, namesize = (fields[0], fields[1], fields[4], fields[6],
                                                  fields[7], fields[11])
        raw = read(namesize, "name")
        read((4 - (CPIO_HEADER + namesize) % 4) % 4, "padding")
        name = raw.rstrip(b"\0").decode("utf-8", "surrogateescape")
        if name == CPIO_TRAILER:
            break
        data_pad = (4 - size % 4) % 4
        rel = _safe_name(name, label)
        if rel == ".":
            read(size + data_pad, "data")
            continue
        kind = stat.S_IFMT(mode)
        perm = mode & 0o755
        if kind == stat.S_IFDIR:
            read(size + data_pad, "data")
            target = parent_ok(rel)
            if os.path.islink(target):
                raise SrpmError(f"{label}: refusing cpio directory {rel!r} over a link")
            os.makedirs(target, exist_ok=True)
            os.chmod(target, perm | 0o700)
        elif kind == stat.S_IFLNK:
            link = read(size, "link").decode("utf-8", "surrogateescape")
            read(data_pad, "padding")
            resolved = os.path.normpath(os.path.join(os.path.dirname(rel), link))
            if link.startswith("/") or resolved == ".." or resolved.startswith("../"):
                raise SrpmError(f"{label}: refusing cpio member {rel!r}: a link to {link!r}, "
                                "outside the destination",
                                hint="get the source RPM from a trusted place")
            os.symlink(link, parent_ok(rel))
        elif kind == stat.S_IFREG:
            target = parent_ok(rel)
            key = (dmaj, ino)
            if nlink > 1 and size == 0:
                pending_links.setdefault(key, []).append(target)  # data comes with the last link
                read(data_pad, "padding")
                names.append(rel)
                continue
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, perm)
            except FileExistsError:
                raise SrpmError(f"{label}: cpio member {rel!r} occurs twice") from None
            with os.fdopen(fd, "wb") as out:
                left = size
                while left:
                    chunk = stream.read(min(left, 1 << 20))
                    if not chunk:
                        raise SrpmError(f"{label}: truncated cpio archive (data of {rel!r})")
                    out.write(chunk)
                    left -= len(chunk)
            read(data_pad, "padding")
            for other in pending_links.pop(key, []):
                os.link(target, other)
        else:
            raise SrpmError(f"{label}: refusing cpio member {rel!r}: special file "
                            f"(mode {mode:o})", hint="source RPMs hold regular files only")
        names.append(rel)
    for others in pending_links.values():  # hard links whose data never came: empty files
        for other in others:
            os.close(os.open(other, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644))
    return names


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
    proc = subprocess.Popen([tool, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    try:
        names = extract_cpio(proc.stdout, dest, path.name)  # type: ignore[arg-type]
        while proc.stdout.read(1 << 16):  # type: ignore[union-attr]
            pass  # cpio pads its archive after the trailer: let rpm2cpio write all of it
        proc.stdout.close()  # type: ignore[union-attr]
        err = proc.stderr.read().decode(errors="replace")  # type: ignore[union-attr]
        if proc.wait(timeout=TOOL_TIMEOUT) != 0:
            raise SrpmError(f"rpm2cpio {path.name} failed: {err.strip()}")
        return names
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- spec files -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class PrepStep:
    """One patch application of %prep, in order."""
    number: int | None     # PatchN, or None for ApplyPatch FILE
    file: str              # file name in the source RPM
    strip: int | None      # patch -pN; None: no -p given (patch(1)'s own default, like rpm)
    fuzz: int              # patch -F N
    args: tuple[str, ...]  # further patch(1) options (-R, -E, -d DIR)
    line: int              # spec line of the directive
    directive: str         # the directive as written (after macro expansion)
    optional: bool = False  # ApplyOptionalPatch: skipped when the file is absent


@dataclass
class SpecInfo:
    name: str
    version: str
    release: str
    sources: dict[int, str]
    patches: dict[int, str]           # number -> file name (basename of the Patch line)
    patch_order: list[int]            # declaration order
    setup: dict[str, Any]             # {"dir", "create", "no_source", "after": [N]}
    prep: list[PrepStep]
    ignored: list[str]                # %prep shell lines not reproduced
    configure: list[str]              # the %build configure command line (expanded, split)
    build_requires: list[str]
    macros: dict[str, str] = field(repr=False, default_factory=dict)


class _Macros:
    """rpm macro expansion, the subset specs of the RHEL 6 era use."""

    def __init__(self, defs: dict[str, str] | None = None):
        self.defs: dict[str, str] = {"nil": "", "_default_patch_fuzz": str(RPM_DEFAULT_PATCH_FUZZ),
                                     "_arch": TARGET_ARCH, "_target_cpu": TARGET_ARCH,
                                     "_prefix": "/usr", "_exec_prefix": "/usr",
                                     "_bindir": "/usr/bin", "_libexecdir": "/usr/libexec",
                                     "_sysconfdir": "/etc", "_localstatedir": "/var",
                                     "_datadir": "/usr/share", "_libdir": "/usr/lib64",
                                     "_smp_mflags": "-j2"}
        self.defs.update(defs or {})

    def define(self, name: str, body: str) -> None:
        self.defs[name] = body

    def expand(self, text: str, depth: int = 0) -> str:
        if depth > 40:
            raise SrpmError("spec: macro expansion too deep (recursive macro?)")
        out, i, n = [], 0, len(text)
        while i < n:
            c = text[i]
            if c != "%" or i + 1 >= n:
                out.append(c)
                i += 1
                continue
            nxt = text[i + 1]
            if nxt == "%":
                out.append("%")
                i += 2
            elif nxt in "{(":
                close = "}" if nxt == "{" else ")"
                j, level = i + 2, 1
                while j < n and level:
                    if text[j] == nxt:
                        level += 1
                    elif text[j] == close:
                        level -= 1
                    j += 1
                if level:
                    out.append(text[i:])
                    break
                inner = text[i + 2:j - 1]
                out.append("" if nxt == "(" else self._brace(inner, text[i:j], depth))
                i = j
            elif nxt == "?" or nxt == "!" or nxt.isalpha() or nxt == "_":
                m = re.match(r"(!?\??!?)([A-Za-z_][A-Za-z0-9_]*)", text[i + 1:])
                if not m:
                    out.append(c)
                    i += 1
                    continue
                flags, name = m.group(1), m.group(2)
                raw = text[i:i + 1 + m.end()]
                if "?" in flags:
                    defined = name in self.defs
                    if "!" in flags:
                        out.append("")
                    else:
                        out.append(self.expand(self.defs[name], depth + 1) if defined else "")
                elif name in self.defs:
                    out.append(self.expand(self.defs[name], depth + 1))
                else:
                    out.append(raw)
                i += 1 + m.end()
            else:
                out.append(c)
                i += 1
        return "".join(out)

    def _brace(self, inner: str, raw: str, depth: int) -> str:
        m = re.match(r"^(!?\??!?)([A-Za-z_][A-Za-z0-9_]*)(?::(.*))?$", inner, re.S)
        if m is None:
            m2 = re.match(r"^(with|without)\s+(\w+)$", inner)
            if m2:
                on = f"with_{m2.group(2)}" in self.defs
                return "1" if on == (m2.group(1) == "with") else "0"
            m3 = re.match(r"^expand:(.*)$", inner, re.S)
            if m3:
                return self.expand(self.expand(m3.group(1), depth + 1), depth + 1)
            return raw
        flags, name, alt = m.group(1), m.group(2), m.group(3)
        if name in ("expand",) and alt is not None:
            return self.expand(self.expand(alt, depth + 1), depth + 1)
        if name == "basename" and alt is not None:
            return os.path.basename(self.expand(alt, depth + 1))
        if "?" in flags:
            defined = name in self.defs
            want = not defined if "!" in flags else defined
            if alt is not None:
                return self.expand(alt, depth + 1) if want else ""
            return self.expand(self.defs[name], depth + 1) if (defined and "!" not in flags) else ""
        if name in self.defs:
            return self.expand(self.defs[name], depth + 1)
        return raw


def _eval_condition(expr: str, where: str) -> bool:
    """%if expressions: integers, "strings", ==, !=, <, >, <=, >=, &&, ||, !, parentheses."""
    tokens = re.findall(r'\s*(\d+|"[^"]*"|&&|\|\||==|!=|<=|>=|[<>!()]|[^\s()<>=!&|"]+)', expr)
    pos = 0

    def peek() -> str | None:
        return tokens[pos].strip() if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        t = tokens[pos].strip()
        pos += 1
        return t

    def atom() -> Any:
        t = peek()
        if t is None:
            raise ValueError("unexpected end")
        if t == "!":
            take()
            return not truth(atom())
        if t == "(":
            take()
            v = orexpr()
            if peek() != ")":
                raise ValueError("missing )")
            take()
            return v
        take()
        if re.fullmatch(r"-?\d+", t):
            return int(t)
        return t.strip('"')

    def truth(v: Any) -> bool:
        return bool(v) if not isinstance(v, str) else v not in ("", "0")

    def cmp() -> Any:
        left = atom()
        while peek() in ("==", "!=", "<", ">", "<=", ">="):
            op, right = take(), atom()
            if isinstance(left, int) != isinstance(right, int):
                left, right = str(left), str(right)
            left = {"==": left == right, "!=": left != right, "<": left < right,
                    ">": left > right, "<=": left <= right, ">=": left >= right}[op]
        return left

    def andexpr() -> Any:
        v = cmp()
        while peek() == "&&":
            take()
            r = cmp()
            v = truth(v) and truth(r)
        return v

    def orexpr() -> Any:
        v = andexpr()
        while peek() == "||":
            take()
            r = andexpr()
            v = truth(v) or truth(r)
        return v

    try:
        v = orexpr()
        if pos != len(tokens):
            raise ValueError(f"unexpected {peek()!r}")
        return truth(v)
    except (ValueError, IndexError) as e:
        raise SrpmError(f"{where}: cannot evaluate %if {expr!r}: {e}",
                        hint="kvmlab evaluates simple integer/string %if expressions only") \
            from None


_SECTIONS = ("%prep", "%build", "%install", "%check", "%clean", "%files", "%changelog",
             "%description", "%package", "%pre", "%post", "%preun", "%postun", "%pretrans",
             "%posttrans", "%triggerin", "%triggerun", "%triggerpostun", "%verifyscript")


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, line) with backslash-newline continuations joined."""
    buf, start = "", 0
    for no, line in enumerate(text.splitlines(), 1):
        if not buf:
            start = no
        if line.endswith("\\"):
            buf += line[:-1] + "\n"
            continue
        yield start, buf + line
        buf = ""
    if buf:
        yield start, buf


def _patch_opts(words: list[str], where: str) -> tuple[list[int], int | None, int | None,
                                                         list[str], list[int]]:
    """Parse %patch options: (-P numbers, -p level, -F fuzz, extra args, positional numbers)."""
    nums: list[int] = []
    pos_nums: list[int] = []
    strip: int | None = None
    fuzz: int | None = None
    extra: list[str] = []
    i = 0
    while i < len(words):
        w = words[i]

        def value() -> str:
            nonlocal i
            if len(w) > 2:
                return w[2:]
            i += 1
            if i >= len(words):
                raise SrpmError(f"{where}: option {w} needs a value")
            return words[i]
        try:
            if w.startswith("-P"):
                nums.append(int(value()))
            elif w.startswith("-p"):
                strip = int(value())
            elif w.startswith("-F") or w.startswith("--fuzz"):
                fuzz = int(w.split("=", 1)[1]) if w.startswith("--fuzz=") else int(value())
            elif w in ("-R", "-E"):
                extra.append(w)
            elif w.startswith("-d"):
                extra += ["-d", value()]
            elif w.startswith("-b") or w.startswith("-z"):
                value()  # backup suffix: kvmlab never keeps backups
            elif w in ("-s", "-q"):
                pass
            elif re.fullmatch(r"\d+", w):
                pos_nums.append(int(w))
            else:
                raise SrpmError(f"{where}: unsupported %patch option {w!r}",
                                hint="supported: -P N, -pN, -F N, -R, -E, -d DIR, -b/-z SUFFIX")
        except ValueError:
            raise SrpmError(f"{where}: bad value in %patch option {w!r}") from None
        i += 1
    return nums, strip, fuzz, extra, pos_nums


def parse_spec(text: str, *, label: str = "spec", defines: dict[str, str] | None = None,
               rpm_tags: dict[str, str] | None = None) -> SpecInfo:
    """Read a spec file: tags, macros, Source/Patch lines, %prep patch steps, %build configure."""
    mac = _Macros(defines)
    sources: dict[int, str] = {}
    patches: dict[int, str] = {}
    order: list[int] = []
    brs: list[str] = []
    tags: dict[str, str] = {}
    prep: list[PrepStep] = []
    ignored: list[str] = []
    build_lines: list[str] = []
    setup: dict[str, Any] = {}
    section = ""
    cond: list[tuple[bool, bool]] = []  # (this branch active, some branch taken)
    applypatch = list(APPLYPATCH_DEFAULT)
    unnumbered_patch = 0

    def active() -> bool:
        return all(a for a, _ in cond)

    for no, line in _logical_lines(text):
        where = f"{label}:{no}"
        s = line.strip()
        # conditionals are evaluated in every section
        m = re.match(r"^%(if|ifarch|ifnarch|ifos|ifnos|elif|else|endif)\b(.*)$", s, re.S)
        if m:
            kw, rest = m.group(1), m.group(2).strip()
            outer = all(a for a, _ in cond)
            if kw == "endif":
                if not cond:
                    raise SrpmError(f"{where}: %endif without %if")
                cond.pop()
            elif kw == "else":
                if not cond:
                    raise SrpmError(f"{where}: %else without %if")
                _, taken = cond[-1]
                cond[-1] = (not taken, True)
            elif kw == "elif":
                if not cond:
                    raise SrpmError(f"{where}: %elif without %if")
                _, taken = cond[-1]
                v = (not taken) and outer_eval(mac, m.group(2), where)
                cond[-1] = (v, taken or v)
            else:
                if not outer:
                    cond.append((False, True))
                    continue
                if kw == "if":
                    v = outer_eval(mac, rest, where)
                elif kw in ("ifarch", "ifnarch"):
                    arches = mac.expand(rest).split()
                    v = (TARGET_ARCH in arches) == (kw == "ifarch")
                else:
                    v = ("linux" in mac.expand(rest).split()) == (kw == "ifos")
                cond.append((v, v))
            continue
        if not active():
            continue
        m = re.match(r"^%(define|global)\s+([A-Za-z_]\w*)(\([^)]*\))?\s*(.*)$", s, re.S)
        if m:
            name, params, body = m.group(2), m.group(3), m.group(4)
            if params is None:
                mac.define(name, body if m.group(1) == "define" else mac.expand(body))
            continue
        m = re.match(r"^%bcond_(with|without)\s+(\w+)", s)
        if m:
            if m.group(1) == "without":  # %bcond_without X: X on by default
                mac.define(f"with_{m.group(2)}", "1")
            continue
        if s.split(None, 1)[0:1] and s.split(None, 1)[0] in _SECTIONS:
            section = s.split(None, 1)[0]
            continue
        if section == "":
            m = re.match(r"^([A-Za-z]+)(\d*)\s*:\s*(.*)$", s)
            if not m:
                continue
            tag, num, value = m.group(1).lower(), m.group(2), mac.expand(m.group(3)).strip()
            if tag in ("name", "version", "release", "epoch"):
                tags[tag] = value
                mac.define(tag, value)
                if tag == "version":
                    mac.define("PACKAGE_VERSION", value)
            elif tag == "source":
                n = int(num) if num else 0
                sources[n] = os.path.basename(value)
                mac.define(f"SOURCE{n}", sources[n])
            elif tag == "patch":
                if num:
                    n = int(num)
                else:  # rpm numbers unnumbered Patch: lines from 0 upwards
                    while unnumbered_patch in patches:
                        unnumbered_patch += 1
                    n = unnumbered_patch
                if n in patches:
                    raise SrpmError(f"{where}: Patch{n} is declared twice")
                patches[n] = os.path.basename(value)
                order.append(n)
                mac.define(f"PATCH{n}", patches[n])
            elif tag == "buildrequires":
                brs.append(value)
            continue
        if section == "%prep":
            _prep_line(mac, s, no, where, patches, order, prep, ignored, setup, applypatch)
        elif section == "%build":
            build_lines.append(mac.expand(line))
    if cond:
        raise SrpmError(f"{label}: %if without %endif")
    for k, v in (rpm_tags or {}).items():  # the RPM header is authoritative (it knows %dist)
        if v:
            tags[k] = v
    return SpecInfo(name=tags.get("name", ""), version=tags.get("version", ""),
                    release=tags.get("release", ""), sources=sources, patches=patches,
                    patch_order=order, setup=setup, prep=prep, ignored=ignored,
                    configure=_configure_line(build_lines), build_requires=brs,
                    macros=dict(mac.defs))


def outer_eval(mac: _Macros, expr: str, where: str) -> bool:
    return _eval_condition(mac.expand(expr).strip(), where)


def _prep_line(mac: _Macros, s: str, no: int, where: str, patches: dict[int, str],
               order: list[int], prep: list[PrepStep], ignored: list[str],
               setup: dict[str, Any], applypatch: list[str]) -> None:
    if not s or s.startswith("#"):
        return
    e = mac.expand(s)
    try:
        words = shlex.split(e, comments=True)
    except ValueError:
        ignored.append(e)
        return
    if not words:
        return
    head = words[0]
    fuzz_default = int(mac.defs.get("_default_patch_fuzz", RPM_DEFAULT_PATCH_FUZZ) or 0)

    def add(num: int, strip: int | None, fuzz: int | None, extra: list[str]) -> None:
        if num not in patches:
            raise SrpmError(f"{where}: {e.strip()!r} refers to Patch{num}, which no Patch{num}: "
                            "line declares", hint="the spec is inconsistent")
        prep.append(PrepStep(num, patches[num], strip, fuzz_default if fuzz is None else fuzz,
                             tuple(extra), no, e.strip()))

    if head in ("%setup", "%autosetup"):
        opts = words[1:]
        i, autop = 0, None
        setup.setdefault("after", [])
        while i < len(opts):
            o = opts[i]
            if o == "-n":
                i += 1
                setup["dir"] = opts[i]
            elif o == "-c":
                setup["create"] = True
            elif o == "-T":
                setup["no_source"] = True
            elif o.startswith("-a"):
                setup["after"].append(int(o[2:] or opts[(i := i + 1)]))
            elif o.startswith("-b"):
                raise SrpmError(f"{where}: %setup -b (unpack before changing into the tree) is "
                                "not supported", hint="kvmlab extracts one tree per source RPM")
            elif o.startswith("-p") and head == "%autosetup":
                autop = int(o[2:] or opts[(i := i + 1)])
            elif o in ("-q", "-D", "-N", "-v") or (o == "-S" and head == "%autosetup"):
                if o == "-S":
                    i += 1
                if o == "-N":
                    setup["no_patches"] = True
            else:
                raise SrpmError(f"{where}: unsupported {head} option {o!r}")
            i += 1
        if head == "%autosetup" and not setup.get("no_patches"):
            for num in order:
                add(num, autop, None, [])
        return
    if head == "%autopatch":
        nums, strip, fuzz, extra, pos = _patch_opts(
            [w for w in words[1:] if not re.match(r"^-[mMv]", w)], where)
        lo = hi = None
        for k, w in enumerate(words[1:]):
            if w.startswith("-m"):
                lo = int(w[2:] or words[k + 2])
            if w.startswith("-M"):
                hi = int(w[2:] or words[k + 2])
        wanted = pos or [n for n in order if (lo is None or n >= lo) and (hi is None or n <= hi)]
        for num in wanted:
            add(num, strip, fuzz, extra)
        return
    m = re.match(r"^%patch(\d*)$", head)
    if m:
        nums, strip, fuzz, extra, pos = _patch_opts(words[1:], where)
        if m.group(1):
            nums.insert(0, int(m.group(1)))
        nums += pos
        if not nums:
            nums = [0]  # a bare %patch applies Patch0
        for num in nums:
            add(num, strip, fuzz, extra)
        return
    if head in ("ApplyPatch", "ApplyOptionalPatch") and len(words) >= 2:
        file = os.path.basename(words[1])
        p = int(applypatch[0][2:])
        f = int(applypatch[1][2:])
        prep.append(PrepStep(None, file, p, f, tuple(words[2:]), no, e.strip(),
                             optional=head == "ApplyOptionalPatch"))
        return
    m = re.match(r"""^patch_command=['"]?patch\s+(.*?)['"]?$""", e.strip())
    if m:
        _, strip, fuzz, _, _ = _patch_opts(
            [w for w in shlex.split(m.group(1)) if w not in ("-s", "--quiet")], where)
        if strip is not None:
            applypatch[0] = f"-p{strip}"
        if fuzz is not None:
            applypatch[1] = f"-F{fuzz}"
        return
    ignored.append(e.strip())


def _configure_line(build_lines: list[str]) -> list[str]:
    """The first configure invocation of %build, split into words (continuations joined)."""
    for entry in build_lines:
        st = entry.replace("\n", " ").strip()
        if re.match(r"^(\.\./|\./|\S*/)?configure\b", st):
            try:
                return shlex.split(st)
            except ValueError:
                return st.split()
    return []


# -- applying %prep -------------------------------------------------------------------------------

@dataclass(frozen=True)
class SrpmTree:
    src_dir: Path
    rpm: RpmInfo
    spec: SpecInfo
    spec_file: str
    applied: list[dict[str, Any]]  # {"name", "sha256", "number", "strip", "fuzz", "args"}
    skipped: list[str]             # optional patches not in the RPM


def _decompressed(path: Path) -> bytes | None:
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix)
    return opener(path, "rb").read() if opener else None  # type: ignore[operator]


def _fail_detail(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines()
             if re.search(r"FAILED|can't find file|No file to patch|Reversed|malformed|garbage",
                          ln)]
    return "; ".join(lines[:4]) or (output.strip().splitlines() or ["no output"])[-1]


def apply_step(tree: Path, sources: Path, step: PrepStep) -> dict[str, Any] | None:
    """Apply one %prep step to tree; None when an optional patch is absent."""
    path = sources / step.file
    what = f"Patch{step.number} ({step.file})" if step.number is not None else step.file
    if not path.is_file():
        if step.optional:
            return None
        raise SrpmError(f"{what} is listed in the spec (line {step.line}: {step.directive!r}) "
                        "but is not in the source RPM",
                        hint="the source RPM is incomplete or the spec is wrong; get a complete "
                             "source RPM")
    data = _decompressed(path)
    levels = ([f"-p{step.strip}"] if step.strip is not None else []) + [f"-F{step.fuzz}"]
    cmd = ["patch", *levels, "-f", "-s", "--no-backup-if-mismatch", "-r", "-", *step.args]
    if data is None:
        cmd += ["-i", str(path)]
    try:
        proc = subprocess.run(cmd, cwd=tree, input=data if data is not None else None,
                              stdin=None if data is not None else subprocess.DEVNULL,
                              capture_output=True, timeout=PATCH_TIMEOUT)
    except FileNotFoundError:
        raise SrpmError("the `patch` program is not installed", hint="apt-get install patch") \
            from None
    except subprocess.TimeoutExpired:
        raise SrpmError(f"{what}: patch did not finish in {PATCH_TIMEOUT}s") from None
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).decode(errors="replace")
        raise SrpmError(f"{what} does not apply with {' '.join(levels)} (spec line "
                        f"{step.line}): {_fail_detail(out)}",
                        hint="the spec's own patches must apply as rpmbuild would apply them; "
                             "the source RPM may be damaged or not match its spec")
    return {"name": step.file, "sha256": sha256_file(path), "number": step.number,
            "strip": step.strip, "fuzz": step.fuzz, "args": list(step.args)}


def find_spec(sources: Path, label: str) -> Path:
    specs = sorted(p for p in sources.iterdir() if p.suffix == ".spec" and p.is_file())
    if len(specs) != 1:
        names = f" ({', '.join(p.name for p in specs)})" if specs else ""
        raise SrpmError(f"{label}: expected exactly one .spec file in the source RPM, found "
                        f"{len(specs)}{names}")
    return specs[0]


def unpack_srpm(srpm: Path, dest: Path, *, keep_sources: Path | None = None) -> SrpmTree:
    """Replace dest with the source RPM's tree after its %prep patches (atomic: on any error dest
    is left as it was). keep_sources: also copy the RPM's files (spec, patches) there."""
    from kvmlab.source.tar import extract_tar  # the same checked tar extraction as plain sources

    srpm = Path(srpm)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.srpm-", dir=dest.parent))
    try:
        sources = tmp / "SOURCES"
        info, _ = extract_rpm(srpm, sources)
        spec_path = find_spec(sources, srpm.name)
        spec = parse_spec(spec_path.read_text(errors="replace"), label=spec_path.name,
                          rpm_tags={"name": info.name, "version": info.version,
                                    "release": info.release})
        tree = tmp / "tree"
        setup = spec.setup
        if not setup and not spec.prep:
            raise SrpmError(f"{spec_path.name}: %prep has no %setup/%autosetup",
                            hint="kvmlab needs %setup to know which tarball holds the tree")
        if setup.get("no_source"):
            tree.mkdir()
        else:
            if 0 not in spec.sources:
                raise SrpmError(f"{spec_path.name}: no Source0 line")
            archive = sources / spec.sources[0]
            if not archive.is_file():
                raise SrpmError(f"Source0 ({spec.sources[0]}) is listed in the spec but is not "
                                "in the source RPM", hint="get a complete source RPM")
            extract_tar(archive, tree, 0 if setup.get("create") else 1)
        for n in setup.get("after", []):
            if n not in spec.sources or not (sources / spec.sources[n]).is_file():
                raise SrpmError(f"%setup -a {n}: Source{n} is not in the source RPM")
            sub = tmp / f"source{n}"
            extract_tar(sources / spec.sources[n], sub, 0)
            for child in sub.iterdir():
                os.replace(child, tree / child.name)
        applied, skipped = [], []
        for step in spec.prep:
            rec = apply_step(tree, sources, step)
            if rec is None:
                skipped.append(step.file)
            else:
                applied.append(rec)
        if keep_sources is not None:
            keep_sources.parent.mkdir(parents=True, exist_ok=True)
            if keep_sources.exists():
                shutil.rmtree(keep_sources)
            shutil.copytree(sources, keep_sources)
        replace_dir(tree, dest)
        return SrpmTree(dest, info, spec, spec_path.name, applied, skipped)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
