"""macros: rpm macro expansion and %if expressions, the subset specs of the RHEL 6 era use.

``Macros.expand`` knows ``%name``, ``%{name}``, ``%{?name}``, ``%{!?name:alt}``, ``%{?name:alt}``,
``%{with X}``, ``%{expand:...}``, ``%{basename:...}``; shell substitutions ``%(...)`` are never
run (they expand to nothing). ``eval_condition`` evaluates an expanded %if expression.
"""
from __future__ import annotations

import os
import re
from typing import Any

from kvmlab.source.srpm import SrpmError

RPM_DEFAULT_PATCH_FUZZ = 0     # rpm >= 4.6 (RHEL 6 ships rpm 4.8): %_default_patch_fuzz 0
TARGET_ARCH = "x86_64"


class Macros:
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


class _Condition:
    """%if expressions: integers, "strings", ==, !=, <, >, <=, >=, &&, ||, !, parentheses."""

    _CMP = ("==", "!=", "<", ">", "<=", ">=")

    def __init__(self, expr: str):
        self.tokens = [t.strip() for t in re.findall(
            r'\s*(\d+|"[^"]*"|&&|\|\||==|!=|<=|>=|[<>!()]|[^\s()<>=!&|"]+)', expr)]
        self.pos = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        t = self.tokens[self.pos]
        self.pos += 1
        return t

    @staticmethod
    def truth(v: Any) -> bool:
        return bool(v) if not isinstance(v, str) else v not in ("", "0")

    def atom(self) -> Any:
        t = self.peek()
        if t is None:
            raise ValueError("unexpected end")
        if t == "!":
            self.take()
            return not self.truth(self.atom())
        if t == "(":
            self.take()
            v = self.orexpr()
            if self.peek() != ")":
                raise ValueError("missing )")
            self.take()
            return v
        self.take()
        if re.fullmatch(r"-?\d+", t):
            return int(t)
        return t.strip('"')

    def cmp(self) -> Any:
        left = self.atom()
        while self.peek() in self._CMP:
            op, right = self.take(), self.atom()
            if isinstance(left, int) != isinstance(right, int):
                left, right = str(left), str(right)
            left = {"==": left == right, "!=": left != right, "<": left < right,
                    ">": left > right, "<=": left <= right, ">=": left >= right}[op]
        return left

    def andexpr(self) -> Any:
        v = self.cmp()
        while self.peek() == "&&":
            self.take()
            r = self.cmp()
            v = self.truth(v) and self.truth(r)
        return v

    def orexpr(self) -> Any:
        v = self.andexpr()
        while self.peek() == "||":
            self.take()
            r = self.andexpr()
            v = self.truth(v) or self.truth(r)
        return v


def eval_condition(expr: str, where: str) -> bool:
    """Evaluate an (expanded) %if expression; SrpmError naming where when it cannot."""
    c = _Condition(expr)
    try:
        v = c.orexpr()
        if c.pos != len(c.tokens):
            raise ValueError(f"unexpected {c.peek()!r}")
        return c.truth(v)
    except (ValueError, IndexError) as e:
        raise SrpmError(f"{where}: cannot evaluate %if {expr!r}: {e}",
                        hint="kvmlab evaluates simple integer/string %if expressions only") \
            from None
