"""trace-kvm task: why qemu's KVM initialisation succeeds or fails, call by call."""
from __future__ import annotations

from invoke import Context

from kvmlab.boot import trace as trace_mod
from kvmlab.core import ui
from kvmlab.host.gdbtrace import GdbReport
from kvmlab.host.trace import TraceReport

from ._common import settings, task


@task(help={"qemu": "qemu-system-x86_64 to trace (default: installed build, else PATH)",
            "guest": "tiny (default) or linux", "disk": "boot this disk image instead "
            "(opened with -snapshot)", "accel": "auto (the binary's default: 0.12 tries KVM), "
            "kvm, or tcg (-no-kvm / -accel tcg)",
            "timeout": "seconds before qemu (and strace/gdb) are killed",
            "json": "print the report as JSON", "gdb": "run a debug build (build --flavour "
            "debug) under gdb with breakpoints on 0.12's KVM init functions"})
def trace_kvm(ctx: Context, qemu: str = "", guest: str = "tiny", disk: str = "",
              accel: str = "auto", timeout: float = 30, json_: bool = False,
              gdb: bool = False) -> None:
    """Run qemu once under strace (or gdb), decode every KVM ioctl, give a verdict."""
    s = settings(ctx)
    kw = {"qemu": qemu or None, "guest": guest, "disk": disk or None, "accel": accel,
          "timeout": timeout}
    if gdb:
        g = trace_mod.gdb_kvm(s, **kw)  # type: ignore[arg-type]
        if json_:
            ui.emit_json(g.to_dict())
        else:
            _show_gdb(g)
        return
    r = trace_mod.trace_kvm(s, **kw)  # type: ignore[arg-type]
    if json_:
        ui.emit_json(r.to_dict())
    else:
        _show(r)


trace_kvm.help["json_"] = trace_kvm.help.pop("json")


def _show(r: TraceReport) -> None:
    rows = []
    for e in r.events:
        if e.kind == "stderr":
            rows.append((f"{e.t * 1000:.3f}", "qemu", "", e.text, "", "info"))
        else:
            rows.append((f"{e.t * 1000:.3f}", e.fd, e.name, e.argument, e.shown_result(),
                         "fail" if e.failed else "ok"))
    ui.table(f"KVM calls of {r.qemu} ({r.version})",
             ["ms", "fd", "call", "argument", "result", "status"], rows)
    colour = {"kvm-used": "green", "not-requested": "yellow"}.get(r.status, "red")
    ui.info(f"verdict: [bold {colour}]{r.verdict}[/bold {colour}]")
    if r.meaning:
        ui.info(f"meaning: {r.meaning}")
    if r.check_next:
        ui.info(f"check next: {r.check_next}")


def _show_gdb(g: GdbReport) -> None:
    rows = [(c.order or "-", c.function, ", ".join(c.args), c.shown_value(),
             "fail" if c is g.failing else "ok") for c in g.calls]
    ui.table(f"KVM init functions of {g.qemu} (gdb)", ["returned #", "function", "arguments",
                                                      "return value", "status"],
             rows)
    if g.missing:
        ui.info("not in this binary: " + ", ".join(g.missing))
    if g.failing:
        ui.info(f"failure point: [bold red]{g.failing.function} returned "
                f"{g.failing.shown_value()}[/bold red]; backtrace:")
        for ln in g.failing.backtrace:
            ui.info(f"  {ln}")
    elif g.calls:
        ui.info("[green]no KVM init function returned an error[/green]")
    if g.timed_out:
        ui.warn("gdb and qemu were stopped at the timeout")
