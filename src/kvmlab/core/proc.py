"""The one process runner: every external command kvmlab runs goes through here.

``run(argv, ...)`` runs a command to completion with a timeout (an argument list, never a shell)
and returns its CompletedProcess; a missing program is one clear ``ToolMissing`` error with the
package that provides it; a timeout kills the whole process group and is a ``CommandTimeout``.
``spawn(argv, ...)`` starts a long-running child in its own session (qemu, strace) so that
``kill_group`` can end it and everything it started. With ``--debug`` (KVMLAB_DEBUG=1) each
command is echoed as ``+ cmd`` on stderr, like ``set -x``.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from kvmlab.core.errors import KvmlabError

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
STDOUT = subprocess.STDOUT
CompletedProcess = subprocess.CompletedProcess
Popen = subprocess.Popen
TimeoutExpired = subprocess.TimeoutExpired

# program -> Debian package, for the "not installed" hint (one phrasing for all of them)
PACKAGES = {
    "qemu-system-x86_64": "qemu-system-x86", "qemu-img": "qemu-utils", "strace": "strace",
    "debootstrap": "debootstrap", "patch": "patch", "readelf": "binutils", "ldd": "libc-bin",
    "ldconfig": "libc-bin", "dpkg": "dpkg", "dpkg-query": "dpkg", "apt-get": "apt",
    "modprobe": "kmod", "insmod": "kmod", "rmmod": "kmod", "modinfo": "kmod",
    "grub-mkrescue": "grub-common", "xorriso": "xorriso", "mformat": "mtools",
    "cpio": "cpio", "rpm2cpio": "rpm2cpio", "zstd": "zstd", "file": "file", "make": "make",
    "cc": "build-essential", "gcc": "build-essential", "busybox": "busybox-static",
    "lspci": "pciutils", "ip": "iproute2", "gdb": "gdb", "git": "git", "tar": "tar",
    "setpriv": "util-linux", "mount": "mount", "umount": "mount",
}


class ToolMissing(KvmlabError):
    """A program kvmlab needs is not installed."""


class CommandTimeout(KvmlabError):
    """A command did not finish within its timeout (its process group was killed)."""


def debug_enabled() -> bool:
    return os.environ.get("KVMLAB_DEBUG", "") not in ("", "0")


def _echo(argv: Sequence[str]) -> None:
    if debug_enabled():
        print("+ " + shlex.join(str(a) for a in argv), file=sys.stderr, flush=True)


def missing_tool(program: str) -> ToolMissing:
    name = Path(program).name
    pkg = PACKAGES.get(name)
    where = f" ({program} not found)" if "/" in program else ""
    hint = f"apt-get install {pkg}" if pkg else f"install {name} or put it on PATH"
    return ToolMissing(f"{name} is not installed{where}", hint=hint)


def run(argv: Sequence[str | os.PathLike[str]], *, timeout: float, check: bool = False,
        capture: bool = True, text: bool = True, input: str | bytes | None = None,
        env: Mapping[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
        stdout: int | IO[Any] | None = None, stderr: int | IO[Any] | None = None,
        what: str | None = None) -> subprocess.CompletedProcess:
    """Run ``argv`` to completion. ``check``: a non-zero exit raises KvmlabError naming ``what``
    (default: the program) with the tail of its output. ``capture``: stdout/stderr are kept
    (unless ``stdout``/``stderr`` redirect them)."""
    args = [str(a) for a in argv]
    _echo(args)
    out = stdout if stdout is not None else (PIPE if capture else None)
    err = stderr if stderr is not None else (PIPE if capture else None)
    try:
        p = subprocess.Popen(args, stdin=PIPE if input is not None else DEVNULL, stdout=out,
                             stderr=err, text=text, env=dict(env) if env is not None else None,
                             cwd=cwd, start_new_session=True)
    except FileNotFoundError:
        raise missing_tool(args[0]) from None
    except PermissionError:
        raise KvmlabError(f"cannot run {args[0]}: permission denied",
                          hint="check that it is an executable file") from None
    try:
        o, e = p.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(p)
        raise CommandTimeout(f"{what or Path(args[0]).name} did not finish within {timeout:g} s",
                             hint="it was killed; run with --debug to see the command") from None
    except BaseException:
        kill_group(p)
        raise
    cp = subprocess.CompletedProcess(args, p.returncode, o, e)
    if check and p.returncode != 0:
        said = e or o or ""
        tail = (said if isinstance(said, str) else said.decode(errors="replace")
                ).strip().splitlines()[-3:]
        raise KvmlabError(f"{what or Path(args[0]).name} failed (exit status {p.returncode})"
                          + (": " + " | ".join(tail) if tail else ""),
                          hint="run with --debug to see the command")
    return cp


def spawn(argv: Sequence[str | os.PathLike[str]], **kw: Any) -> subprocess.Popen:
    """Start a long-running child in its own session (end it with kill_group)."""
    args = [str(a) for a in argv]
    _echo(args)
    kw.setdefault("stdin", DEVNULL)
    try:
        return subprocess.Popen(args, start_new_session=True, **kw)
    except FileNotFoundError:
        raise missing_tool(args[0]) from None


def stream(argv: Sequence[str | os.PathLike[str]], *, timeout: float,
           on_line: Callable[[str], Any], env: Mapping[str, str] | None = None,
           cwd: str | os.PathLike[str] | None = None, what: str | None = None) -> int:
    """Run ``argv`` with stdout+stderr merged, handing each line (decoded, newline kept) to
    ``on_line`` as it comes; its exit status. After ``timeout`` seconds in all (a silent, hung
    child included) its process group is killed and CommandTimeout raised."""
    p = spawn(argv, stdout=PIPE, stderr=STDOUT, env=dict(env) if env is not None else None,
              cwd=cwd)
    timed_out = threading.Event()

    def watchdog() -> None:
        timed_out.set()
        kill_group(p, wait=0)

    timer = threading.Timer(max(0.1, timeout), watchdog)
    timer.daemon = True
    timer.start()
    try:
        assert p.stdout is not None
        for raw in iter(p.stdout.readline, b""):
            on_line(raw.decode("utf-8", errors="replace"))
        rc = int(p.wait(timeout=60))
    finally:
        timer.cancel()
        kill_group(p)
    if timed_out.is_set():
        raise CommandTimeout(f"{what or Path(str(argv[0])).name} timed out after {timeout:.0f} s "
                             "and was stopped", hint="its process group was killed")
    return rc


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """For the duration: SIGTERM raises KeyboardInterrupt, so the same cleanup runs as for
    Ctrl-C (containers removed, VMs killed). A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def kill_group(proc: subprocess.Popen, wait: float = 10) -> None:
    """SIGKILL a child started with start_new_session=True and its whole process group."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL not delivered
        pass
