"""trace-kvm --gdb: qemu-kvm 0.12's KVM start, function by function, under gdb in batch mode.

A debug build (``invoke build --flavour debug``: -O0 -g, unstripped) runs under ``gdb -batch``
with a breakpoint on each KVM init function that the 0.12 tree has (``INIT_FUNCTIONS``, read
from qemu-kvm.c and qemu-kvm-x86.c of qemu-kvm-0.12.1.2). At each one the gdb Python script
records the arguments (``info args``) and sets a FinishBreakpoint that records the return value
(what ``finish`` prints) and, when it is negative, the backtrace: the failure point. Each record
is one ``KVMLAB-GDB {json}`` line on gdb's stdout. Functions the binary does not have are listed
as missing, not guessed. gdb and qemu are killed when the run ends, times out or is interrupted.
"""
from __future__ import annotations

import errno as errno_mod
import json
import os
import signal
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvmlab.core import proc
from kvmlab.core.errors import HostError

# qemu-kvm-0.12.1.2: kvm_init (qemu-kvm.c) -> kvm_create_context -> kvm_create ->
# kvm_create_vm, kvm_arch_create (qemu-kvm-x86.c: kvm_init_tss -> kvm_set_tss_addr,
# kvm_init_identity_map_page, kvm_create_pit, kvm_init_coalesced_mmio), kvm_create_irqchip;
# then per CPU kvm_init_vcpu -> kvm_create_vcpu, kvm_arch_init_vcpu.
INIT_FUNCTIONS = ("kvm_init", "kvm_create_context", "kvm_create", "kvm_create_vm",
                  "kvm_arch_create", "kvm_init_tss", "kvm_set_tss_addr",
                  "kvm_init_identity_map_page", "kvm_create_pit", "kvm_init_coalesced_mmio",
                  "kvm_create_irqchip", "kvm_arch_qemu_create_context", "kvm_init_vcpu",
                  "kvm_create_vcpu", "kvm_arch_init_vcpu")
TAG = "KVMLAB-GDB "
KILL_WAIT = 10

_SCRIPT = r'''
import gdb, json
TAG = %(tag)r
def emit(d):
    print(TAG + json.dumps(d), flush=True)
class Ret(gdb.FinishBreakpoint):
    def __init__(self, frame, fn):
        super().__init__(frame, internal=True)
        self.fn = fn
    def stop(self):
        rv = self.return_value
        ev = {"event": "return", "function": self.fn, "value": None}
        if rv is not None:
            try:
                ev["value"] = int(rv)
            except gdb.error:
                ev["value"] = str(rv)
        if isinstance(ev["value"], int) and ev["value"] < 0:
            ev["backtrace"] = gdb.execute("bt", to_string=True).splitlines()
        emit(ev)
        return False
    def out_of_scope(self):
        emit({"event": "return", "function": self.fn, "value": None, "note": "out of scope"})
class Entry(gdb.Breakpoint):
    def stop(self):
        args = [a.strip() for a in gdb.execute("info args", to_string=True).splitlines()
                if "=" in a]
        emit({"event": "call", "function": self.location, "args": args,
              "pid": gdb.selected_inferior().pid})
        try:
            Ret(gdb.newest_frame(), self.location)
        except Exception as e:
            emit({"event": "error", "function": self.location, "error": str(e)})
        return False
for cmd in ("set pagination off", "set confirm off", "set debuginfod enabled off",
            "set startup-with-shell off",
            "handle SIGUSR1 SIGUSR2 SIGALRM SIGIO SIGPIPE SIGCHLD nostop noprint pass"):
    try:
        gdb.execute(cmd)
    except gdb.error:
        pass
have, missing = [], []
for fn in %(funcs)r:
    if gdb.lookup_global_symbol(fn) is None and gdb.lookup_static_symbol(fn) is None:
        missing.append(fn)
        continue
    Entry(fn, internal=False)
    have.append(fn)
emit({"event": "breakpoints", "set": have, "missing": missing})
gdb.execute("run")
emit({"event": "exited"})
'''


@dataclass(frozen=True)
class GdbCall:
    function: str
    args: list[str]
    value: int | str | None = None     # return value (None: void / not reached)
    returned: bool = False
    backtrace: list[str] = field(default_factory=list)
    order: int = 0                     # 1, 2, ...: the order in which the calls returned

    def shown_value(self) -> str:
        if not self.returned:
            return "(did not return)"
        if isinstance(self.value, int) and self.value < -1:
            # qemu-kvm 0.12's kvm_ioctl/kvm_vm_ioctl return -errno
            return f"{self.value} (-{errno_mod.errorcode.get(-self.value, '?')})"
        return "void" if self.value is None else str(self.value)


@dataclass
class GdbReport:
    qemu: str
    argv: list[str]
    breakpoints: list[str]
    missing: list[str]
    calls: list[GdbCall]
    failing: GdbCall | None
    timed_out: bool
    exit_code: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse(stdout: str) -> tuple[list[str], list[str], list[GdbCall], int | None]:
    """(breakpoints set, functions missing, calls with their return values, qemu's pid)."""
    have: list[str] = []
    missing: list[str] = []
    calls: list[dict[str, Any]] = []
    pid = None
    for ln in stdout.splitlines():
        if not ln.startswith(TAG):
            continue
        ev = json.loads(ln[len(TAG):])
        if ev["event"] == "breakpoints":
            have, missing = ev["set"], ev["missing"]
        elif ev["event"] == "call":
            pid = pid or ev.get("pid")
            calls.append({"function": ev["function"], "args": ev["args"]})
        elif ev["event"] == "return":
            open_ = [c for c in calls if c["function"] == ev["function"] and "returned" not in c]
            if open_:
                open_[-1].update(returned=True, value=ev["value"], order=len(
                    [c for c in calls if "returned" in c]) + 1,
                                 backtrace=ev.get("backtrace", []))
    return have, missing, [GdbCall(**c) for c in calls], pid


def _kill_pid(pid: int | None) -> None:
    """qemu under a killed gdb is detached, not ended: end it by its pid."""
    if not pid:
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def gdb_trace(qemu: Path, argv: list[str], timeout: float) -> GdbReport:
    """Run ``argv`` (qemu first) under gdb batch with the init breakpoints; see the docstring."""
    with tempfile.TemporaryDirectory(prefix="kvmlab-gdb-") as tmp:
        script = Path(tmp) / "kvm-init.py"
        script.write_text(_SCRIPT % {"tag": TAG, "funcs": INIT_FUNCTIONS})
        out = Path(tmp) / "gdb.out"
        with open(out, "wb") as fout:
            p = proc.spawn(["gdb", "-nx", "-batch", "-x", str(script), "--args", *argv],
                           stdout=fout, stderr=proc.STDOUT)
        timed_out = False
        try:
            p.wait(timeout=timeout)
        except proc.TimeoutExpired:
            timed_out = True
        finally:
            proc.kill_group(p, wait=KILL_WAIT)
            text = out.read_text(errors="replace")
            _kill_pid(parse(text)[3])
    have, missing, calls, _pid = parse(text)
    if not have and not timed_out:
        tail = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(TAG)][-3:]
        raise HostError(f"gdb set no breakpoint in {qemu}: none of the KVM init functions "
                        f"({', '.join(INIT_FUNCTIONS[:4])}, ...) is in it",
                        hint="give trace-kvm --gdb a qemu-kvm 0.12 debug build "
                             "(invoke build --flavour debug)"
                             + ("; gdb said: " + " | ".join(tail) if tail else ""))
    # the failure point: the first call to return a negative value (the innermost)
    failed = sorted((c for c in calls if isinstance(c.value, int) and c.value < 0),
                    key=lambda c: c.order)
    failing = failed[0] if failed else None
    return GdbReport(str(qemu), argv, have, missing, calls, failing, timed_out, p.returncode)
