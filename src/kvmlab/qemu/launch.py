"""A headless, bounded qemu launch: the argv, the process in its own session, always killed.

``headless_args`` is what every kvmlab launch has in common (paused, no window, a monitor on a
unix socket with the version's socket options); ``vm_args`` adds what a test VM needs (name,
serial log, pidfile, no network, no reboot). ``running(argv, ...)`` starts qemu through
kvmlab.core.proc.spawn with stdout/stderr to files and yields a ``Running``: its monitor client
(``connect`` within a deadline, with qemu's own words when it fails) and the process. On leaving
the block — normal end, timeout, error, Ctrl-C (and SIGTERM under proc.sigterm_as_interrupt) —
the monitor is closed and qemu's whole process group is killed.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kvmlab.core import proc
from kvmlab.core.errors import VMError
from kvmlab.qemu.binary import QemuBinary, socket_opts
from kvmlab.qemu.monitor import Monitor


def headless_args(qemu: QemuBinary | tuple[int, ...], sock: Path) -> list[str]:
    """Paused, no display, serial and parallel ports to nowhere, the human monitor on ``sock``.

    ``qemu``: a probed binary, or only its version (what ``binary.version_line`` gives) — the
    socket options depend on it. Works from qemu-kvm 0.12 on.
    """
    version = qemu.version_tuple if isinstance(qemu, QemuBinary) else tuple(qemu)
    return ["-S", "-nographic", "-serial", "null", "-parallel", "none",
            "-monitor", f"unix:{sock},{socket_opts(version)}"]


def vm_args(qb: QemuBinary, *, name: str, serial: Path, pidfile: Path, sock: Path,
            accel: str, memory: int) -> list[str]:
    """argv of a headless, paused one-CPU ``pc`` VM without network that exits on reboot; the
    serial port goes to the file ``serial``, the monitor (QMP when available) to ``sock``."""
    return [str(qb.path), "-name", name, "-M", "pc", "-m", str(memory), "-smp", "1",
            *qb.accel_args(accel), *qb.display_args, "-net", "none",
            "-serial", f"file:{serial}", "-pidfile", str(pidfile), "-no-reboot",
            *qb.monitor_args(sock), "-S"]


def stderr_lines(path: Path) -> list[str]:
    """The non-empty lines qemu wrote to its stderr file ([] when there is none)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


@dataclass
class Running:
    """A qemu started by ``running``: its process, monitor client and stderr file."""
    proc: proc.Popen
    monitor: Monitor
    stderr: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def connect(self, deadline: float) -> None:
        """Connect the monitor by ``deadline``; when qemu dies or does not answer: qemu killed,
        VMError saying what it printed."""
        try:
            self.monitor.connect(deadline, self.alive)
        except (VMError, OSError, ValueError) as e:
            raise self.did_not_start(e) from None

    def did_not_start(self, e: Exception) -> VMError:
        """Kill qemu; the VMError for "its monitor never answered" with what qemu printed."""
        self.kill()
        said = stderr_lines(self.stderr)
        msg = e.message if isinstance(e, VMError) else str(e)
        rc = self.proc.returncode
        return VMError(f"qemu did not start: {msg}"
                       + (f" (exit status {rc})" if rc is not None else ""),
                       hint=("qemu said: " + " | ".join(said[-4:])) if said else
                       "run the command shown by --dry-run by hand")

    def wait(self, timeout: float) -> bool:
        """True when qemu exited by itself within ``timeout`` seconds."""
        try:
            self.proc.wait(timeout=timeout)
            return True
        except proc.TimeoutExpired:
            return False

    def kill(self) -> None:
        self.monitor.close()
        proc.kill_group(self.proc)


@contextmanager
def running(argv: list[str], *, sock: Path, qmp: bool, stderr: Path,
            stdout: Path | None = None, cwd: Path | None = None,
            env: Mapping[str, str] | None = None) -> Iterator[Running]:
    """Start ``argv`` (qemu with a monitor on ``sock``) in its own session, stdout/stderr to
    files; qemu is killed when the block ends, however it ends."""
    with open(stderr, "wb") as err, open(stdout or os.devnull, "wb") as out:
        try:
            p = proc.spawn(argv, stdout=out, stderr=err, cwd=cwd,
                           env={**os.environ, **env} if env is not None else None)
        except OSError as e:
            raise VMError(f"cannot start {argv[0]}: {e.strerror}") from None
    r = Running(p, Monitor(sock, qmp), stderr)
    try:
        yield r
    finally:
        r.kill()
