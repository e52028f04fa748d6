"""spec: read an rpm spec for what its %prep does (macros, conditionals, the patch steps).

:func:`parse_spec` understands ``%setup``, ``%patchN -pX``, ``%patch -P N -pX``, ``%patch N``,
``%autosetup -pX`` / ``%autopatch`` (every Patch line, in the order of declaration), and the RHEL 6
kernel-style ``ApplyPatch FILE [ARGS]`` shell function (its ``-p``/``-F`` levels come from the
spec's own ``patch_command='patch ...'`` line). Macros defined with ``%define``/``%global``/
``%bcond_with[out]`` are expanded, ``%if``/``%ifarch`` blocks are evaluated (arch x86_64), shell
substitutions ``%(...)`` are never run (they expand to nothing).

Levels: the spec's own ``-pN``; without one, no ``-p`` is passed (as rpm does; patch(1) then uses
the bare file name). Fuzz: ``%patch`` uses rpm's ``%_default_patch_fuzz``, which is 0 since rpm
4.6 and so on RHEL 6 (rpm 4.8); a spec may override it (``%global _default_patch_fuzz 2``).
``ApplyPatch`` uses the levels of the spec's own patch_command (qemu-kvm's RHEL 6 spec:
``patch -p1 -F1 -s``, i.e. fuzz 1, though it applies its Patch lines with ``%patchN``); without
such a line ``-p1 -F1`` (the RHEL 6 kernel spec's value) is assumed.

Other %prep shell lines are not executed (they are reported as ``ignored``): kvmlab never runs a
downloaded spec's shell code. Only the patch steps are reproduced (kvmlab.source.unpack applies
them with the one patch runner, kvmlab.source.patchrun).
"""
from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from kvmlab.source.macros import RPM_DEFAULT_PATCH_FUZZ, TARGET_ARCH, Macros, eval_condition
from kvmlab.source.srpm import SrpmError

APPLYPATCH_DEFAULT = ("-p1", "-F1")  # RHEL 6 kernel.spec: patch_command='patch -p1 -F1 -s'


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


def _opt_value(words: list[str], i: int, where: str) -> tuple[str, int]:
    """The value of option words[i] (joined, -p1, or the next word, -p 1) and its index."""
    w = words[i]
    if len(w) > 2:
        return w[2:], i
    if i + 1 >= len(words):
        raise SrpmError(f"{where}: option {w} needs a value")
    return words[i + 1], i + 1


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
        try:
            if w.startswith("-P"):
                v, i = _opt_value(words, i, where)
                nums.append(int(v))
            elif w.startswith("-p"):
                v, i = _opt_value(words, i, where)
                strip = int(v)
            elif w.startswith("--fuzz="):
                fuzz = int(w.split("=", 1)[1])
            elif w.startswith("-F") or w.startswith("--fuzz"):
                v, i = _opt_value(words, i, where)
                fuzz = int(v)
            elif w in ("-R", "-E"):
                extra.append(w)
            elif w.startswith("-d"):
                v, i = _opt_value(words, i, where)
                extra += ["-d", v]
            elif w.startswith("-b") or w.startswith("-z"):
                _, i = _opt_value(words, i, where)  # backup suffix: kvmlab never keeps backups
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


_COND_RE = re.compile(r"^%(if|ifarch|ifnarch|ifos|ifnos|elif|else|endif)\b(.*)$", re.S)
_DEFINE_RE = re.compile(r"^%(define|global)\s+([A-Za-z_]\w*)(\([^)]*\))?\s*(.*)$", re.S)
_BCOND_RE = re.compile(r"^%bcond_(with|without)\s+(\w+)")
_TAG_RE = re.compile(r"^([A-Za-z]+)(\d*)\s*:\s*(.*)$")
_PATCH_COMMAND_RE = re.compile(r"""^patch_command=['"]?patch\s+(.*?)['"]?$""")


class _SpecReader:
    """The state of one pass over a spec: the preamble's tags, %if nesting, %prep steps."""

    def __init__(self, label: str, defines: dict[str, str] | None):
        self.label = label
        self.mac = Macros(defines)
        self.sources: dict[int, str] = {}
        self.patches: dict[int, str] = {}
        self.order: list[int] = []
        self.brs: list[str] = []
        self.tags: dict[str, str] = {}
        self.prep: list[PrepStep] = []
        self.ignored: list[str] = []
        self.build_lines: list[str] = []
        self.setup: dict[str, Any] = {}
        self.section = ""
        self.cond: list[tuple[bool, bool]] = []  # (this branch active, some branch taken)
        self.applypatch = list(APPLYPATCH_DEFAULT)
        self.unnumbered_patch = 0

    def active(self) -> bool:
        return all(a for a, _ in self.cond)

    def line(self, no: int, line: str) -> None:
        where = f"{self.label}:{no}"
        s = line.strip()
        m = _COND_RE.match(s)
        if m:  # conditionals are evaluated in every section
            self.conditional(m.group(1), m.group(2), where)
            return
        if not self.active() or self.definition(s):
            return
        first = s.split(None, 1)[0] if s.split(None, 1) else ""
        if first in _SECTIONS:
            self.section = first
        elif self.section == "":
            self.preamble(s, where)
        elif self.section == "%prep":
            _PrepLine(self, s, no, where).run()
        elif self.section == "%build":
            self.build_lines.append(self.mac.expand(line))

    def evaluate(self, expr: str, where: str) -> bool:
        return eval_condition(self.mac.expand(expr).strip(), where)

    def conditional(self, kw: str, raw: str, where: str) -> None:
        cond, rest = self.cond, raw.strip()
        if kw in ("endif", "else", "elif") and not cond:
            raise SrpmError(f"{where}: %{kw} without %if")
        if kw == "endif":
            cond.pop()
        elif kw == "else":
            _, taken = cond[-1]
            cond[-1] = (not taken, True)
        elif kw == "elif":
            _, taken = cond[-1]
            v = (not taken) and self.evaluate(raw, where)
            cond[-1] = (v, taken or v)
        elif not self.active():
            cond.append((False, True))
        else:
            if kw == "if":
                v = self.evaluate(rest, where)
            elif kw in ("ifarch", "ifnarch"):
                v = (TARGET_ARCH in self.mac.expand(rest).split()) == (kw == "ifarch")
            else:
                v = ("linux" in self.mac.expand(rest).split()) == (kw == "ifos")
            cond.append((v, v))

    def definition(self, s: str) -> bool:
        """%define / %global / %bcond_with[out]: True when s was one."""
        m = _DEFINE_RE.match(s)
        if m:
            name, params, body = m.group(2), m.group(3), m.group(4)
            if params is None:
                self.mac.define(name, body if m.group(1) == "define" else self.mac.expand(body))
            return True
        m = _BCOND_RE.match(s)
        if m:
            if m.group(1) == "without":  # %bcond_without X: X on by default
                self.mac.define(f"with_{m.group(2)}", "1")
            return True
        return False

    def preamble(self, s: str, where: str) -> None:
        m = _TAG_RE.match(s)
        if not m:
            return
        tag, num, value = m.group(1).lower(), m.group(2), self.mac.expand(m.group(3)).strip()
        if tag in ("name", "version", "release", "epoch"):
            self.tags[tag] = value
            self.mac.define(tag, value)
            if tag == "version":
                self.mac.define("PACKAGE_VERSION", value)
        elif tag == "source":
            n = int(num) if num else 0
            self.sources[n] = os.path.basename(value)
            self.mac.define(f"SOURCE{n}", self.sources[n])
        elif tag == "patch":
            self.declare_patch(int(num) if num else None, value, where)
        elif tag == "buildrequires":
            self.brs.append(value)

    def declare_patch(self, num: int | None, value: str, where: str) -> None:
        if num is None:  # rpm numbers unnumbered Patch: lines from 0 upwards
            while self.unnumbered_patch in self.patches:
                self.unnumbered_patch += 1
            num = self.unnumbered_patch
        if num in self.patches:
            raise SrpmError(f"{where}: Patch{num} is declared twice")
        self.patches[num] = os.path.basename(value)
        self.order.append(num)
        self.mac.define(f"PATCH{num}", self.patches[num])

    def result(self, rpm_tags: dict[str, str] | None) -> SpecInfo:
        if self.cond:
            raise SrpmError(f"{self.label}: %if without %endif")
        tags = dict(self.tags)
        for k, v in (rpm_tags or {}).items():  # the RPM header is authoritative (it knows %dist)
            if v:
                tags[k] = v
        return SpecInfo(name=tags.get("name", ""), version=tags.get("version", ""),
                        release=tags.get("release", ""), sources=self.sources,
                        patches=self.patches, patch_order=self.order, setup=self.setup,
                        prep=self.prep, ignored=self.ignored,
                        configure=_configure_line(self.build_lines), build_requires=self.brs,
                        macros=dict(self.mac.defs))


def parse_spec(text: str, *, label: str = "spec", defines: dict[str, str] | None = None,
               rpm_tags: dict[str, str] | None = None) -> SpecInfo:
    """Read a spec file: tags, macros, Source/Patch lines, %prep patch steps, %build configure."""
    reader = _SpecReader(label, defines)
    for no, line in _logical_lines(text):
        reader.line(no, line)
    return reader.result(rpm_tags)


class _PrepLine:
    """One %prep line: a patch step (%setup/%autosetup/%autopatch/%patch/ApplyPatch), the
    ApplyPatch levels (patch_command=...), or an ignored shell line."""

    def __init__(self, spec: _SpecReader, s: str, no: int, where: str):
        self.spec, self.s, self.no, self.where = spec, s, no, where
        self.e = ""
        self.fuzz_default = int(spec.mac.defs.get("_default_patch_fuzz", RPM_DEFAULT_PATCH_FUZZ)
                                or 0)

    def run(self) -> None:
        if not self.s or self.s.startswith("#"):
            return
        self.e = e = self.spec.mac.expand(self.s)
        try:
            words = shlex.split(e, comments=True)
        except ValueError:
            self.spec.ignored.append(e)
            return
        if not words:
            return
        head = words[0]
        m = re.match(r"^%patch(\d*)$", head)
        if head in ("%setup", "%autosetup"):
            self.setup(head, words[1:])
        elif head == "%autopatch":
            self.autopatch(words[1:])
        elif m:
            self.patch(m.group(1), words[1:])
        elif head in ("ApplyPatch", "ApplyOptionalPatch") and len(words) >= 2:
            p, f = (int(x[2:]) for x in self.spec.applypatch)
            self.spec.prep.append(PrepStep(None, os.path.basename(words[1]), p, f,
                                           tuple(words[2:]), self.no, e.strip(),
                                           optional=head == "ApplyOptionalPatch"))
        elif m2 := _PATCH_COMMAND_RE.match(e.strip()):
            self.patch_command(m2.group(1))
        else:
            self.spec.ignored.append(e.strip())

    def add(self, num: int, strip: int | None, fuzz: int | None, extra: list[str]) -> None:
        patches = self.spec.patches
        if num not in patches:
            raise SrpmError(f"{self.where}: {self.e.strip()!r} refers to Patch{num}, which no "
                            f"Patch{num}: line declares", hint="the spec is inconsistent")
        self.spec.prep.append(PrepStep(num, patches[num], strip,
                                       self.fuzz_default if fuzz is None else fuzz,
                                       tuple(extra), self.no, self.e.strip()))

    def setup(self, head: str, opts: list[str]) -> None:
        setup, where = self.spec.setup, self.where
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
            for num in self.spec.order:
                self.add(num, autop, None, [])

    def autopatch(self, args: list[str]) -> None:
        nums, strip, fuzz, extra, pos = _patch_opts(
            [w for w in args if not re.match(r"^-[mMv]", w)], self.where)
        lo = hi = None
        for k, w in enumerate(args):
            if w.startswith("-m"):
                lo = int(w[2:] or args[k + 1])
            if w.startswith("-M"):
                hi = int(w[2:] or args[k + 1])
        wanted = pos or [n for n in self.spec.order
                         if (lo is None or n >= lo) and (hi is None or n <= hi)]
        for num in wanted:
            self.add(num, strip, fuzz, extra)

    def patch(self, number: str, args: list[str]) -> None:
        nums, strip, fuzz, extra, pos = _patch_opts(args, self.where)
        if number:
            nums.insert(0, int(number))
        nums += pos
        for num in nums or [0]:  # a bare %patch applies Patch0
            self.add(num, strip, fuzz, extra)

    def patch_command(self, args: str) -> None:
        _, strip, fuzz, _, _ = _patch_opts(
            [w for w in shlex.split(args) if w not in ("-s", "--quiet")], self.where)
        if strip is not None:
            self.spec.applypatch[0] = f"-p{strip}"
        if fuzz is not None:
            self.spec.applypatch[1] = f"-F{fuzz}"


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


