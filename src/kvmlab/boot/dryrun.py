"""`boot-test --dry-run`: the qemu command line a person can paste as is; nothing is written.

A real boot-test starts qemu paused (-S) with its monitor on a socket in a temporary directory,
the serial console in a file of its run directory and per-run copies of the guest with a fresh
nonce. None of that exists after a dry run, so the command printed here is the interactive
equivalent: the same qemu, machine, memory, accelerator and guest files (the cached guest,
opened with snapshot=on so the cache is never modified), serial console on the terminal, no
pause and no monitor socket. It exits when the guest powers off; Ctrl-C ends it otherwise.
"""
from __future__ import annotations

from pathlib import Path

from kvmlab.boot import guest as guest_mod
from kvmlab.boot import vm
from kvmlab.core.errors import VMError
from kvmlab.core.settings import Settings
from kvmlab.qemu.binary import QemuBinary


def _drive(path: Path, index: int, media: str, fmt: str, snapshot: bool) -> list[str]:
    opt = f"file={path},if=ide,index={index},media={media},format={fmt}"
    return ["-drive", opt + (",snapshot=on" if snapshot else "")]


def _user_disk(disk: str | Path | None, index: int) -> list[str]:
    if not disk:
        return []
    d = Path(disk).expanduser().resolve()
    if not d.is_file():
        raise VMError(f"disk image not found: {d}", hint="create one: invoke create-image PATH")
    with open(d, "rb") as f:
        fmt = "qcow2" if f.read(4) == b"QFI\xfb" else "raw"
    return _drive(d, index, "disk", fmt, snapshot=True)


def _guest(settings: Settings, qb: QemuBinary, kind: str, *, disk: str | Path | None,
           kernel: str | Path | None, init_script: str | None,
           iso: str | Path | None) -> list[str]:
    if kind == "tiny":
        g = guest_mod.make_tiny(settings, build=False)
        assert g.disk is not None
        return [*_drive(g.disk, 0, "disk", "raw", snapshot=True), "-boot", "c",
                *_user_disk(disk, 1)]
    args = _user_disk(disk, 0)
    if kind == "linux":
        g = guest_mod.make_linux(settings, kernel, init_script, build=False)
        use = g.vmlinux if qb.version_tuple >= (4, 0, 0) and g.vmlinux else g.kernel
        return [*args, "-kernel", str(use), "-initrd", str(g.initrd), "-append", g.cmdline]
    if kind == "iso":
        g = guest_mod.make_iso(settings, kernel, init_script, build=False)
        assert g.iso is not None
        return [*args, *_drive(g.iso, 2, "cdrom", "raw", snapshot=False), "-boot", "d"]
    user_iso = Path(iso or "").expanduser().resolve()
    if not iso or not user_iso.is_file():
        raise VMError(f"ISO not found: {user_iso}")
    return [*args, *_drive(user_iso, 2, "cdrom", "raw", snapshot=False), "-boot", "d"]


def command(settings: Settings, *, qemu: str | Path | None = None, accel: str = "auto",
            guest: str = "tiny", iso: str | Path | None = None,
            kernel: str | Path | None = None, disk: str | Path | None = None,
            memory: int = vm.DEFAULT_MEMORY, init_script: str | None = None) -> list[str]:
    """argv of an interactive boot of the guest (see the module docstring)."""
    kind = "user-iso" if iso else guest
    if kind not in (*vm.GUESTS, "user-iso"):
        raise VMError(f"unknown guest {guest!r}", hint="use one of " + ", ".join(vm.GUESTS))
    qb = vm.find_qemu(settings, qemu)
    want, _why = vm.choose_accel(accel)
    # -nographic already puts the serial console (muxed with the monitor) on the terminal
    console = [] if qb.display_args == ["-nographic"] else ["-serial", "stdio"]
    return [str(qb.path), "-name", f"kvmlab-{kind}", "-M", "pc", "-m", str(memory),
            "-smp", "1", *qb.accel_args(want), *qb.display_args, "-net", "none", *console,
            "-no-reboot", *_guest(settings, qb, kind, disk=disk, kernel=kernel,
                                  init_script=init_script, iso=iso)]
