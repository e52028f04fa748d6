"""Typed task flags: one table says what each flag takes, and drives parsing and help.

invoke infers a flag's type from its default (``jobs=2`` -> int) and turns a bad value into a
Python traceback (``int('abc')``), and its help shows ``INT``/``STRING`` only. Here every typed
flag gets a *kind* that invoke calls with the raw text: it returns the parsed value or raises
invoke's ParseError carrying kvmlab's "error: ... / hint: ..." lines, which invoke prints before
exiting 1 — before the task has started or written anything.

``FLAGS`` maps a flag name to its type; ``TASK_FLAGS`` overrides it for one task where the same
name means something else there (``--kind`` of guest vs explain-exit).
"""
from __future__ import annotations

import math
import os
import re
import shutil
import stat as st_mod
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from invoke.exceptions import ParseError

from kvmlab.boot import guest as guest_mod
from kvmlab.boot import image as image_mod
from kvmlab.boot.iso import check_iso
from kvmlab.boot.kernel import check_kernel
from kvmlab.core import ui
from kvmlab.core.elf import read_modinfo
from kvmlab.core.errors import KvmlabError
from kvmlab.host import exits
from kvmlab.lab import inventory as inventory_mod
from kvmlab.lab import remote
from kvmlab.lab import steps as lab_steps
from kvmlab.lab import verify as verify_mod
from kvmlab.nested.record import MODULE_SOURCES
from kvmlab.qemu.binary import probe_qemu


class FlagValueError(ValueError):
    """A flag value that its type refuses (message, hint)."""

    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.message, self.hint = message, hint


@dataclass(frozen=True)
class FlagType:
    """What a flag takes: ``metavar`` and ``describe`` go into --help; ``parse`` converts."""
    metavar: str
    describe: str
    parse: Callable[[str], Any]
    example: str

    def convert(self, flag: str, raw: str) -> Any:
        try:
            return self._convert(flag, raw)
        except ParseError as e:
            json_refusal(e)
            raise

    def _convert(self, flag: str, raw: str) -> Any:
        try:
            return self.parse(raw)
        except FlagValueError as e:
            raise ParseError(_lines(f"--{flag}: {e.message}", e.hint)) from None
        except KvmlabError as e:
            raise ParseError(_lines(f"--{flag}: {e.message}",
                                    e.hint or f"e.g. --{flag} {self.example}")) from None
        except ValueError:
            raise ParseError(_lines(f"--{flag}: {raw!r} is not {self.describe}",
                                    f"e.g. --{flag} {self.example}")) from None

    def kind(self, flag: str) -> type:
        """A class invoke can call with the raw text (its Argument.kind)."""
        ftype = self

        class Kind:
            def __new__(cls, raw: str) -> Any:  # noqa: D102 - invoke calls kind(raw)
                return ftype.convert(flag, raw)

        Kind.__name__ = Kind.__qualname__ = self.metavar
        return Kind


def json_refusal(e: ParseError) -> None:
    """A ParseError refuses the command line before any task ran (a bad flag value, a bad
    ``-f FILE``): under --json the caller still gets one document, ``{"error", "hint"}``, on
    stdout; invoke prints the same two lines on stderr and exits 1."""
    if "--json" not in sys.argv[1:] or getattr(e, "_kvmlab_emitted", False):
        return
    e._kvmlab_emitted = True  # type: ignore[attr-defined]  # one document, however re-raised
    error, _, hint = str(e).partition("\nhint: ")
    if not hint and not error.startswith("error: "):   # invoke's own: "No idea what '-x' is!"
        hint = "`--help TASK` lists the flags of TASK; `--list` the tasks"
    ui.emit_json({"error": error.removeprefix("error: "), "hint": hint or None})


def _lines(message: str, hint: str) -> str:
    # invoke prints a ParseError as is; make it look like every other kvmlab error
    return f"error: {message}\nhint: {hint}"


# --------------------------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------------------------

def integer(lo: int, hi: int, unit: str = "") -> FlagType:
    what = f"a whole number from {lo} to {hi}" + (f" ({unit})" if unit else "")

    def parse(raw: str) -> int:
        try:
            v = int(raw.strip(), 10)
        except ValueError:
            raise FlagValueError(f"{raw!r} is not a whole number", f"give {what}") from None
        if not lo <= v <= hi:
            raise FlagValueError(f"{v} is out of range", f"give {what}")
        return v
    return FlagType("INT", what, parse, str(lo if lo > 0 else 1))


def seconds(zero_means_default: bool) -> FlagType:
    what = "a number of seconds" + (" (0: the default)" if zero_means_default else " > 0")

    def parse(raw: str) -> float:
        try:
            v = float(raw.strip())
        except ValueError:
            raise FlagValueError(f"{raw!r} is not a number of seconds",
                                 "give seconds as a number, e.g. 30 or 0.5") from None
        if math.isnan(v) or math.isinf(v):
            raise FlagValueError(f"{raw!r} is not a finite number of seconds", f"give {what}")
        if v < 0 or (v == 0 and not zero_means_default):
            raise FlagValueError(f"{raw} is not a usable time", f"give {what}")
        return v
    return FlagType("SECONDS", what, parse, "30")


def choice(*values: str) -> FlagType:
    what = "one of " + ", ".join(values)

    def parse(raw: str) -> str:
        if raw not in values:
            raise FlagValueError(f"{raw!r} is not {what}", f"choose {what}")
        return raw
    return FlagType("CHOICE", what, parse, values[0])


def choices(*values: str) -> FlagType:
    """A comma-separated list of values from a fixed set."""
    what = "a comma-separated list of " + ", ".join(values)

    def parse(raw: str) -> str:
        items = [x for x in raw.split(",") if x.strip()]
        bad = [x for x in items if x not in values]
        if bad or not items:
            raise FlagValueError(f"{', '.join(map(repr, bad or [raw]))}: not one of "
                                 + ", ".join(values), f"give {what}")
        return ",".join(items)
    return FlagType("LIST", what, parse, values[0])


def _expand(raw: str) -> Path:
    if not raw.strip():
        raise FlagValueError("an empty path", "give a path")
    return Path(os.path.expanduser(raw))


def _existing(raw: str, want: str) -> str:
    p = _expand(raw)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise FlagValueError(f"{raw}: no such {'directory' if want == 'dir' else 'file'}",
                             "check the path") from None
    except NotADirectoryError:
        raise FlagValueError(f"{raw}: a part of the path is not a directory",
                             "check the path") from None
    except PermissionError:
        raise FlagValueError(f"{raw}: permission denied", "check the path's permissions") from None
    if want == "file" and not st_mod.S_ISREG(st.st_mode):
        raise FlagValueError(f"{raw} is not a regular file"
                             + (" (it is a directory)" if st_mod.S_ISDIR(st.st_mode) else ""),
                             "give the path of a file")
    if want == "dir" and not st_mod.S_ISDIR(st.st_mode):
        raise FlagValueError(f"{raw} is not a directory", "give the path of a directory")
    if not os.access(p, os.R_OK):
        raise FlagValueError(f"{raw}: not readable", "check the path's permissions")
    return raw


def existing_file() -> FlagType:
    return FlagType("FILE", "an existing file", lambda raw: _existing(raw, "file"), "PATH")


def existing_dir() -> FlagType:
    return FlagType("DIR", "an existing directory", lambda raw: _existing(raw, "dir"), "DIR")


def existing_path() -> FlagType:
    return FlagType("PATH", "an existing file or directory",
                    lambda raw: _existing(raw, "any"), "PATH")


def _path_list(metavar: str, describe: str, noun: str, check: Callable[[str], object],
               example: str) -> FlagType:
    """A comma-separated list of paths, each one checked."""
    def parse(raw: str) -> str:
        items = [x for x in raw.split(",") if x.strip()]
        if not items:
            raise FlagValueError(f"no {noun} given", f"give comma-separated {noun}s")
        for x in items:
            check(x)
        return ",".join(items)
    return FlagType(metavar, describe, parse, example)


def dir_list() -> FlagType:
    return _path_list("DIRS", "comma-separated existing directories", "directory",
                      lambda x: _existing(x, "dir"), "/usr/share/seabios")


def program(check: Callable[[str], None] | None = None, example: str = "PATH") -> FlagType:
    """An executable file, or a command name found on PATH; ``check`` asks it what it is."""
    def parse(raw: str) -> str:
        path = _executable(raw)
        if check is not None:
            check(path)
        return path
    return FlagType("PROGRAM", "an executable", parse, example)


def _check_qemu(path: str) -> None:
    probe_qemu(path)


def _check_qemu_img(path: str) -> None:
    if image_mod.qemu_img_version(path) == (0, 0):
        raise FlagValueError(f"{path} is not qemu-img (`{path} --help` names no qemu-img version)",
                             "give the path of a qemu-img binary")


def _module_file(path: str) -> None:
    _existing(path, "file")
    read_modinfo(path)


def modules() -> FlagType:
    return _path_list("FILES", "comma-separated kernel module files (.ko)", "module file",
                      _module_file, "kvm.ko,kvm-amd.ko")


def _content(check: Callable[[Path], None], metavar: str, what: str, example: str) -> FlagType:
    def parse(raw: str) -> str:
        _existing(raw, "file")
        check(_expand(raw))
        return raw
    return FlagType(metavar, what, parse, example)


def _check_kernel(p: Path) -> None:
    check_kernel(p)


def _check_iso(p: Path) -> None:
    check_iso(p)


def kernel_image() -> FlagType:
    return _content(_check_kernel, "FILE", "a Linux kernel image (bzImage)",
                    "/boot/vmlinuz-6.1.0-26-amd64")


def iso_image() -> FlagType:
    return _content(_check_iso, "FILE", "an ISO 9660 image", "CentOS-6.10-x86_64-minimal.iso")


def _executable(raw: str) -> str:
    if "/" not in raw and raw.strip():
        found = shutil.which(raw)
        if not found:
            raise FlagValueError(f"{raw}: no such command on PATH",
                                 "give the path of the binary")
        return found
    _existing(raw, "file")
    if not os.access(_expand(raw), os.X_OK):
        raise FlagValueError(f"{raw} is not executable", "give the path of the binary")
    return raw


def install_root(kind: str) -> FlagType:
    """--prefix (absolute) / --destdir: a directory path that is not an existing file."""
    def parse(raw: str) -> str:
        p = _expand(raw)
        if kind == "prefix" and not p.is_absolute():
            raise FlagValueError(f"{raw!r} is not an absolute path",
                                 "a prefix is absolute, e.g. /usr/local or /opt/qemu-kvm")
        cur = p
        while not cur.exists() and cur != cur.parent:
            cur = cur.parent
        if not cur.is_dir():
            raise FlagValueError(f"{cur} is a file, not a directory",
                                 f"give a directory for --{kind}")
        return raw
    return FlagType("ROOT", "a directory (created when missing)", parse,
                    "/usr/local" if kind == "prefix" else "/tmp/stage")


def new_file() -> FlagType:
    """A file to create: its directory must exist and be writable; not an existing directory."""
    def parse(raw: str) -> str:
        p = _expand(raw)
        if p.is_dir():
            raise FlagValueError(f"{raw} is a directory", "give the path of the file to create")
        parent = p.parent if str(p.parent) else Path(".")
        if not parent.is_dir():
            raise FlagValueError(f"{parent}: no such directory", "create the directory first")
        if not os.access(parent, os.W_OK | os.X_OK):
            why = "read-only file system" if _read_only(parent) else "permission denied"
            raise FlagValueError(f"cannot write in {parent}: {why}",
                                 "choose a writable directory")
        return raw
    return FlagType("FILE", "a file to create", parse, "disk.qcow2")


def _read_only(p: Path) -> bool:
    try:
        return bool(os.statvfs(p).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def cpu_model() -> FlagType:
    """A qemu -cpu value: a model name with optional +feature/-feature/key=value items."""
    def parse(raw: str) -> str:
        if not re.fullmatch(r"[A-Za-z][\w.-]*(,[+-]?[A-Za-z][\w.-]*(=[\w.-]+)?)*", raw):
            raise FlagValueError(f"{raw!r} is not a qemu CPU model",
                                 "e.g. max (TCG emulates SVM there), qemu64,-svm, EPYC; "
                                 "qemu-system-x86_64 -cpu help lists them")
        return raw
    return FlagType("CPU", "a qemu -cpu model", parse, "max")


def inventory() -> FlagType:
    """lab --hosts: an inventory of ssh hosts (read now: a missing or malformed file, or a
    group that selects nothing, is refused before the task starts)."""
    def parse(raw: str) -> str:
        remote.ssh_hosts_of(raw)
        return raw
    return FlagType("INVENTORY", "an inventory, FILE or FILE:GROUP (kvmlab's host list, TOML, "
                    "or an Ansible INI/YAML inventory)", parse, "hosts.ini:labs")


def host_list() -> FlagType:
    """verify --hosts: testinfra hosts and inventories, comma-separated."""
    def parse(raw: str) -> str:
        items = [x for x in raw.split(",") if x.strip()]
        if not items:
            raise FlagValueError("no host given", "e.g. --hosts local:// or --hosts hosts.ini")
        for x in items:
            if "://" in x:
                verify_mod.check_host_spec(x)
            elif not inventory_mod.split_value(x)[0].exists():
                raise FlagValueError(f"{x!r} is no testinfra host and no inventory file",
                                     "write local://, docker://NAME or ssh://user@host, or "
                                     "give an inventory: FILE or FILE:GROUP")
            else:
                inventory_mod.load_hosts(x)
        return ",".join(items)
    return FlagType("HOSTS", "comma-separated testinfra hosts (local://, docker://NAME, "
                    "ssh://user@host) or inventories (FILE, FILE:GROUP)", parse, "local://")


def size() -> FlagType:
    def parse(raw: str) -> str:
        if image_mod.parse_size(raw) <= 0:
            raise FlagValueError(f"{raw!r} is not a usable size", "e.g. 10G, 512M")
        return raw
    return FlagType("SIZE", "a size such as 10G or 512M", parse, "10G")


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

def _guest_kinds() -> tuple[str, ...]:
    return tuple(guest_mod.KINDS)


def _exit_kinds() -> tuple[str, ...]:
    return ("auto", *exits.KINDS)


FLAGS: dict[str, FlagType] = {
    "jobs": integer(1, 256, "parallel make jobs"),
    "memory": integer(16, 1 << 20, "MiB"),
    "timeout": seconds(zero_means_default=True),
    "accel": choice("auto", "kvm", "tcg"),
    "flavour": choice("release", "debug"),   # build --flavour (trace-kvm --gdb wants debug)
    "mode": choice("copy", "symlink", "make-install"),
    "format": choice("qcow2", "raw"),
    "size": size(),
    "source": existing_path(),
    "kernel": kernel_image(),
    "init": existing_file(),
    "iso": iso_image(),
    "disk": existing_file(),
    "qemu": program(_check_qemu, "/usr/bin/qemu-system-x86_64"),
    "qemu_img": program(_check_qemu_img, "/usr/bin/qemu-img"),
    "ko": modules(),
    "from_": existing_dir(),
    "firmware_from": dir_list(),
    "prefix": install_root("prefix"),
    "destdir": install_root("destdir"),
    "path": new_file(),
    "output": new_file(),     # report --output
}

TASK_FLAGS: dict[tuple[str, str], Callable[[], FlagType]] = {
    ("doctor", "timeout"): lambda: seconds(zero_means_default=False),
    ("install-bios", "timeout"): lambda: seconds(zero_means_default=False),
    ("guest", "kind"): lambda: choice(*_guest_kinds()),
    ("boot-test", "guest"): lambda: choices(*_guest_kinds()),
    ("lab", "guest"): lambda: choice(*_guest_kinds()),
    ("explain-exit", "kind"): lambda: choice(*_exit_kinds()),
    ("uninstall", "step"): lambda: choice("install", "install-bios"),
    ("lab", "hosts"): inventory,
    ("verify", "hosts"): host_list,
    ("lab", "skip"): lambda: choices(*lab_steps.NAMES),   # the step registry's names
    ("trace-kvm", "guest"): lambda: choice("tiny", "linux"),
    ("trace-kvm", "timeout"): lambda: seconds(zero_means_default=False),
    ("nested", "modules"): lambda: choice(*MODULE_SOURCES),
    ("nested", "cpu"): cpu_model,
    ("lab", "nested_cpu"): cpu_model,
}


def flag_type(task: str, name: str) -> FlagType | None:
    make = TASK_FLAGS.get((task, name))
    return make() if make else FLAGS.get(name)
