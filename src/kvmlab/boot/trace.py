"""What trace-kvm boots: a test guest (or a disk) for kvmlab.host.trace / kvmlab.host.gdbtrace.

``trace_kvm(settings, ...)`` picks the qemu (--qemu > installed build > PATH > distribution, as
boot-test does), makes the guest's arguments (tiny: its boot disk; linux: -kernel/-initrd/
-append; --disk: that image), always with ``-snapshot`` so the trace never writes to a disk, and
runs the strace trace (host.trace) or, with ``gdb=True``, the gdb batch run (host.gdbtrace).
"""
from __future__ import annotations

from pathlib import Path

from kvmlab.boot import guest as guest_mod
from kvmlab.boot.vm import find_qemu
from kvmlab.core.settings import Settings
from kvmlab.host import gdbtrace, trace

GUESTS = ("tiny", "linux")


def guest_args(settings: Settings, guest: str, disk: str | Path | None) -> list[str]:
    """qemu arguments that boot ``disk`` or the test guest ``guest`` (tiny or linux)."""
    if disk:
        return ["-hda", str(disk), "-snapshot"]
    g = guest_mod.make_guest(settings, guest)
    if guest == "linux":
        assert g.kernel is not None and g.initrd is not None
        return ["-kernel", str(g.kernel), "-initrd", str(g.initrd), "-append", g.cmdline]
    assert g.disk is not None
    return ["-hda", str(g.disk), "-snapshot"]


def trace_kvm(settings: Settings, *, qemu: str | Path | None = None, guest: str = "tiny",
              disk: str | Path | None = None, accel: str = "auto",
              timeout: float = trace.DEFAULT_TIMEOUT) -> trace.TraceReport:
    """One strace-traced run of qemu booting the guest (see kvmlab.host.trace)."""
    qb = find_qemu(settings, qemu)
    cfg = trace.TraceConfig(qb.path, guest_args(settings, guest, disk), accel, timeout)
    return trace.trace_kvm(cfg)


def gdb_kvm(settings: Settings, *, qemu: str | Path | None = None, guest: str = "tiny",
            disk: str | Path | None = None, accel: str = "auto",
            timeout: float = trace.DEFAULT_TIMEOUT) -> gdbtrace.GdbReport:
    """The same run under gdb batch with breakpoints on the KVM init functions."""
    qb = find_qemu(settings, qemu)
    cfg = trace.TraceConfig(qb.path, guest_args(settings, guest, disk), accel, timeout)
    argv = trace.qemu_argv(qb, cfg, Path("/dev/null"))
    return gdbtrace.gdb_trace(qb.path, argv, timeout)
