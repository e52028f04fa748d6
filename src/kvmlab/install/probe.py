"""Asking a qemu binary which firmware files it opens: one short, paused start under strace.

The questions themselves go through the qemu room: ``kvmlab.qemu.binary`` (version, ``-L help``),
``kvmlab.qemu.launch.headless_args`` and the one monitor client (``kvmlab.qemu.monitor.quit``).
What is install's own is reading the answers: the firmware paths a start tried (strace, or a
debug-bios-path build's own lines) and the missing-file messages.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from kvmlab.core import proc
from kvmlab.core.errors import InstallError
from kvmlab.qemu import binary, launch, monitor
from kvmlab.qemu.binary import version_tuple

# names a qemu binary asks for in its data dirs
FIRMWARE_RE = re.compile(r"\.(bin|rom|img|fd|aml)$")


@dataclass
class ProbeRun:
    """One short, paused start of a qemu binary."""
    qemu: Path
    argv: list[str]
    started: bool               # alive and the monitor answered
    exit_code: int | None
    stderr: str
    monitor_banner: str
    attempts: list[tuple[str, bool]]   # (absolute path, found?) for firmware-like files
    missing_fatal: list[str]           # file names whose absence stopped it
    missing_warn: list[str]            # file names it warned about
    loaded: dict[str, str]             # file name -> path it opened
    strace: bool
    reported_dirs: list[tuple[str, str]] = field(default_factory=list)  # debug-bios-path lines

    @property
    def ok(self) -> bool:
        return self.started

    def tried(self, name: str) -> list[str]:
        return [p for p, _ in self.attempts if os.path.basename(p) == name]


# ---------------------------------------------------------------------------------------------
# questions answered on stdout
def qemu_version(qemu: Path, timeout: float = 10) -> str:
    """The first line of `qemu -version`; InstallError saying why it did not answer."""
    return binary.version_line(qemu, timeout, error=InstallError)


# ---------------------------------------------------------------------------------------------
# what a paused start says and tries
_STRACE_RE = re.compile(
    r'^(?:\[pid\s+\d+\]\s+|\d+\s+)?(open|openat|access|faccessat2?|stat|newfstatat|statx)'
    r'\((?:AT_FDCWD, |-?\d+, )?"((?:[^"\\]|\\.)*)"[^=]*?\)\s*=\s*(-?\d+)')
_FATAL_RES = [
    re.compile(r"could not load PC BIOS '([^']+)'"),
    re.compile(r'failed to find romfile "([^"]+)"'),
    re.compile(r"could not load VGA BIOS '([^']+)'"),
]
_WARN_RES = [
    re.compile(r"Could not open option rom '([^']+)'"),
    re.compile(r"could not load VGA BIOS '([^']+)'"),
    re.compile(r"Could not load option rom '([^']+)'"),
]
# lines printed by a binary built with patches/<recipe>/debug-bios-path.patch
_DEBUG_TRY_RE = re.compile(r"^qemu: (?:(loading) firmware '([^']+)' from '([^']+)'|"
                           r"firmware '([^']+)' not found at '([^']+)')", re.M)
_DEBUG_DIR_RE = re.compile(r"^qemu: firmware directory '([^']+)' \(([^)]+)\)", re.M)
_STRACE_ARGS = ["-f", "-qq", "-s", "4096", "-e", "trace=open,openat,access,faccessat,faccessat2"]


def _parse_strace(text: str) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    for line in text.splitlines():
        mo = _STRACE_RE.match(line.strip())
        if not mo:
            continue
        path = mo.group(2)
        if not FIRMWARE_RE.search(path) or path.startswith(("/proc/", "/sys/", "/dev/")):
            continue
        if not path.startswith("/"):
            continue
        out.append((os.path.normpath(path), int(mo.group(3)) >= 0))
    return out


def _debug_attempts(stderr: str, attempts: list[tuple[str, bool]], strace: bool
                    ) -> list[tuple[str, bool]]:
    """attempts plus the lookups a debug-bios-path binary reports itself."""
    out = list(attempts)
    seen_paths = {p for p, _ in attempts}
    for mo in _DEBUG_TRY_RE.finditer(stderr):
        path = os.path.normpath(mo.group(3) or mo.group(5))
        ok = mo.group(1) == "loading"
        if path.startswith("/") and (path, ok) not in out and (
                not strace or path not in seen_paths):
            out.append((path, ok))
    return out


def _missing(stderr: str, started: bool) -> tuple[list[str], list[str]]:
    """(fatal, warned) file names from stderr; nothing is fatal for a binary that started."""
    fatal: list[str] = []
    warn: list[str] = []
    for rx in _FATAL_RES:
        for mo in rx.finditer(stderr):
            n = os.path.basename(mo.group(1))
            if rx.pattern.startswith("could not load VGA") and started:
                continue
            if n not in fatal:
                fatal.append(n)
    for rx in _WARN_RES:
        for mo in rx.finditer(stderr):
            n = os.path.basename(mo.group(1))
            if n not in warn and n not in fatal:
                warn.append(n)
    if started:
        return [], warn + [n for n in fatal if n not in warn]
    return fatal, warn


def _strace_refused(stderr: str) -> bool:
    return any(ln.startswith("strace:") and ("PTRACE" in ln or "Operation not permitted" in ln)
               for ln in stderr.splitlines())


# ---------------------------------------------------------------------------------------------
# the paused start
def _await_monitor(child: proc.Popen, sock: Path, timeout: float) -> tuple[bool, str, int | None]:
    """(started, monitor banner, exit code) once it answered and quit, exited, or timed out."""
    banner = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.poll() is None:
        if sock.exists():
            try:
                banner = monitor.quit(sock, max(1.0, deadline - time.monotonic()))
            except OSError:
                banner = ""
            if banner:
                try:
                    return True, banner, child.wait(timeout=10)
                except proc.TimeoutExpired:
                    return True, banner, None
        time.sleep(0.05)
    return False, banner, child.poll()


def _run_paused(argv: list[str], work: Path, errf: IO[bytes], env: dict[str, str] | None,
                timeout: float) -> tuple[bool, str, int | None]:
    """Run argv in work (stderr to errf) until its monitor answered or it ended; then kill its
    process group whatever happened."""
    child = proc.spawn(argv, cwd=work, stdout=proc.DEVNULL, stderr=errf,
                       env={**os.environ, **(env or {})})
    try:
        return _await_monitor(child, work / "mon.sock", timeout)
    finally:
        proc.kill_group(child)


def run_probe(qemu: Path, *, timeout: float = 20, use_strace: bool | None = None,
              extra_args: list[str] | None = None, env: dict[str, str] | None = None
              ) -> ProbeRun:
    """Start qemu paused and headless with a monitor on a unix socket; quit it via the monitor.

    started=True when it stayed alive and its monitor answered (it got past firmware loading).
    Under strace (when installed), every firmware-like path it tried is recorded.
    """
    strace = shutil.which("strace") if use_strace in (None, True) else None
    if use_strace and not strace:
        raise InstallError("strace is not installed", hint="apt-get install strace")
    version = version_tuple(qemu_version(qemu))
    work = Path(tempfile.mkdtemp(prefix="kvmlab-probe-"))
    trace = work / "strace.out"
    argv = [str(qemu), *launch.headless_args(version, work / "mon.sock"), *(extra_args or [])]
    full = ([strace, *_STRACE_ARGS, "-o", str(trace)] if strace else []) + argv
    try:
        with open(work / "stderr", "w+b") as errf:
            started, banner, code = _run_paused(full, work, errf, env, timeout)
            errf.seek(0)
            stderr = errf.read().decode("utf-8", "replace")
        attempts = _parse_strace(trace.read_text(errors="replace")) if trace.exists() else []
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if strace and not started and not attempts and _strace_refused(stderr):
        # ptrace not allowed here (e.g. a container without CAP_SYS_PTRACE): ask without it
        return run_probe(qemu, timeout=timeout, use_strace=False, extra_args=extra_args, env=env)
    attempts = _debug_attempts(stderr, attempts, bool(strace))
    fatal, warn = _missing(stderr, started)
    loaded: dict[str, str] = {}
    for p, ok in attempts:
        if ok:
            loaded.setdefault(os.path.basename(p), p)
    reported = [(m.group(1), m.group(2)) for m in _DEBUG_DIR_RE.finditer(stderr)]
    return ProbeRun(qemu, argv, started, code, stderr, banner, attempts, fatal, warn, loaded,
                    bool(strace), reported)
