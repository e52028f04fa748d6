"""trace-kvm: one bounded, headless qemu run under strace, every KVM ioctl decoded, a verdict.

``trace_kvm(TraceConfig)`` runs ``strace -f -ttt -yy -X raw -e trace=ioctl,openat,write`` over
qemu (no window, serial to a file, no network, no reboot, the guest's arguments from the caller)
within ``timeout`` seconds; strace and qemu run in their own process group, killed on timeout,
error or Ctrl-C. ``-yy`` names each fd (``/dev/kvm``, ``anon_inode:kvm-vm``,
``anon_inode:kvm-vcpu:N``) so calls on the system, VM and vCPU fds are told apart; ``-X raw``
leaves the ioctl numbers raw, so kvmlab.host.kvmioctl decodes them itself (unknown numbers stay
raw). qemu's own stderr lines are the ``write(2, ...)`` calls in the same trace, so they sit in
time order between the ioctls. The verdict (kvmlab.host.tracefacts): KVM used (KVM_RUN entered),
the first failing call with what it means and what to check next, or KVM not requested
(``-no-kvm`` / ``-accel tcg``).
"""
from __future__ import annotations

import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvmlab.core import proc
from kvmlab.core.errors import HostError
from kvmlab.host import kvmioctl, tracefacts
from kvmlab.qemu.binary import QemuBinary, probe_qemu

STRACE_ARGS = ["-f", "-ttt", "-yy", "-qq", "-X", "raw", "-s", "1024",
               "-e", "trace=ioctl,openat,write"]
DEFAULT_TIMEOUT = 30.0
STATUSES = ("kvm-used", "kvm-failed", "not-requested", "undecided")
_LINE_RE = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(.*)$")
_FD = r"(-?\d+)<((?:[^<>]|<[^<>]*>)*)>"
_IOCTL_RE = re.compile(rf"^ioctl\({_FD}, (0x[0-9a-f]+|\d+), ?(.*)$")
_WRITE_RE = re.compile(rf'^write\({_FD}, "((?:[^"\\]|\\.)*)"')
_OPENAT_RE = re.compile(r'^openat\([^,]+, "((?:[^"\\]|\\.)*)",')
_RESULT_RE = re.compile(r"^(-?\d+|\?)(?:<[^\n]*?>)?(?:\s+([A-Z][A-Z0-9]+))?")
_BENIGN = {("KVM_RUN", "EINTR"), ("KVM_RUN", "EAGAIN")}


@dataclass(frozen=True)
class TraceEvent:
    """One line of the trace that matters: a KVM ioctl, the open of /dev/kvm, a stderr line."""
    t: float                 # seconds since the first traced line
    pid: int
    kind: str                # ioctl | open | stderr
    fd: str = ""             # system | vm | vcpu (ioctl); the path (open)
    name: str = ""           # KVM_* or the raw number
    number: int = 0
    argument: str = ""
    result: int | None = None
    errno: str = ""          # errno name when the call failed
    text: str = ""           # the stderr line

    @property
    def failed(self) -> bool:
        return self.result is not None and self.result < 0

    def shown_result(self) -> str:
        if self.result is None:
            return "?"
        return f"-1 {self.errno}" if self.failed else str(self.result)


@dataclass
class TraceReport:
    qemu: str
    version: str
    argv: list[str]
    kvm_requested: bool
    status: str
    verdict: str
    meaning: str = ""
    check_next: str = ""
    failing: TraceEvent | None = None
    events: list[TraceEvent] = field(default_factory=list)
    exit_code: int | None = None
    timed_out: bool = False
    qemu_pid: int | None = None
    kvm_runs: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["failing"] = asdict(self.failing) if self.failing else None
        return d


@dataclass(frozen=True)
class TraceConfig:
    qemu: Path
    guest_args: list[str]            # what boots: -hda DISK, or -kernel/-initrd/-append
    accel: str = "auto"              # auto (the binary's default, KVM first), kvm, tcg
    timeout: float = DEFAULT_TIMEOUT
    memory: int = 64
    extra_args: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# reading strace's output

def _scope(path: str) -> str | None:
    if "kvm-vcpu" in path:
        return "vcpu"
    if "kvm-vm" in path:
        return "vm"
    if path.startswith("/dev/kvm"):
        return "system"
    return None


def _unescape(s: str) -> str:
    return s.encode("latin-1", "backslashreplace").decode("unicode_escape", "replace")


def _result(text: str) -> tuple[int | None, str]:
    m = _RESULT_RE.match(text.strip())
    if not m or m.group(1) == "?":
        return None, ""
    return int(m.group(1)), m.group(2) or ""


def _join_resumed(lines: list[str]) -> list[tuple[int, float, str]]:
    """(pid, time, call text) with ``<unfinished ...>`` / ``<... resumed>`` pairs joined."""
    pending: dict[int, tuple[float, str]] = {}
    out = []
    for ln in lines:
        m = _LINE_RE.match(ln)
        if not m:
            continue
        pid, t, rest = int(m.group(1)), float(m.group(2)), m.group(3)
        if rest.endswith("<unfinished ...>"):
            pending[pid] = (t, rest[: -len("<unfinished ...>")].rstrip())
            continue
        r = re.match(r"^<\.\.\. \w+ resumed>\s?(.*)$", rest)
        if r:
            t0, head = pending.pop(pid, (t, ""))
            out.append((pid, t0, head + r.group(1)))
            continue
        out.append((pid, t, rest))
    return out


def _ioctl(pid: int, t: float, m: re.Match[str], rest: str) -> TraceEvent | None:
    scope = _scope(m.group(2))
    if scope is None:
        return None
    number = int(m.group(3), 0)
    args, _sep, res = m.group(4).rpartition(") = ")
    result, err = _result(res)
    d = kvmioctl.decode(scope, number, args.strip())
    return TraceEvent(t, pid, "ioctl", scope, d.name, number, d.argument, result, err)


def parse(text: str) -> list[TraceEvent]:
    """The KVM ioctls, /dev/kvm opens and stderr lines of an strace log (STRACE_ARGS), in order;
    times are relative to the first line."""
    events: list[TraceEvent] = []
    partial: dict[int, str] = {}
    t_first: float | None = None
    for pid, t, rest in _join_resumed(text.splitlines()):
        t_first = t if t_first is None else t_first
        rel = round(t - t_first, 6)
        if (m := _IOCTL_RE.match(rest)) is not None:
            ev = _ioctl(pid, rel, m, rest)
            if ev is not None:
                events.append(ev)
        elif (m := _WRITE_RE.match(rest)) is not None and m.group(1) == "2":
            buf = partial.pop(pid, "") + _unescape(m.group(3))
            *lines, tail = buf.split("\n")
            events += [TraceEvent(rel, pid, "stderr", text=ln) for ln in lines if ln.strip()]
            if tail:
                partial[pid] = tail
        elif (m := _OPENAT_RE.match(rest)) is not None and m.group(1) == "/dev/kvm":
            result, err = _result(rest.rpartition(") = ")[2])
            events.append(TraceEvent(rel, pid, "open", "/dev/kvm", "open(/dev/kvm)",
                                     argument="O_RDWR", result=result, errno=err))
    events += [TraceEvent(events[-1].t if events else 0.0, pid, "stderr", text=tail)
               for pid, tail in partial.items() if tail.strip()]
    return events


# ---------------------------------------------------------------------------------------------
# the verdict

def kvm_requested(argv: list[str]) -> bool:
    """False when the command line turns KVM off (-no-kvm of qemu-kvm, -accel tcg,
    -machine accel=tcg)."""
    joined = " ".join(argv)
    if "-no-kvm" in argv:
        return False
    return re.search(r"(-accel tcg\b|accel=tcg\b)", joined) is None


def _fallback(events: list[TraceEvent]) -> str:
    said = [e.text for e in events if e.kind == "stderr" and "disable KVM" in e.text]
    return " and fell back to TCG" if said else ""


def verdict(argv: list[str], events: list[TraceEvent]) -> dict[str, Any]:
    """status, verdict, meaning, check_next and the failing event, from the trace alone."""
    requested = kvm_requested(argv)
    runs = [e for e in events if e.kind == "ioctl" and e.name == "KVM_RUN"]
    failing = next((e for e in events if e.kind in ("ioctl", "open") and e.failed
                    and (e.name, e.errno) not in _BENIGN), None)
    if not requested and not runs:
        return {"status": "not-requested", "failing": None, "check_next": "",
                "verdict": "KVM was not requested (-no-kvm / -accel tcg): qemu ran under TCG",
                "meaning": "the command line turned KVM off; no KVM call was expected"}
    if runs and (failing is None or failing.t > runs[0].t):
        return {"status": "kvm-used", "failing": failing, "check_next": "",
                "verdict": f"KVM used: {len(runs)} KVM_RUN call(s) entered the guest",
                "meaning": "qemu initialised KVM and ran the vCPU in the kernel"}
    if failing is not None:
        fact = (tracefacts.explain_open(failing.errno) if failing.kind == "open"
                else tracefacts.explain(failing.name, failing.errno))
        return {"status": "kvm-failed", "failing": failing, "meaning": fact.meaning,
                "check_next": fact.check_next,
                "verdict": f"KVM not used: {failing.name}"
                           f"({'' if failing.argument == '-' else failing.argument}) = -1 "
                           f"{failing.errno} on the {failing.fd} fd{_fallback(events)}"}
    return {"status": "undecided", "failing": None, "meaning": "",
            "check_next": "a longer --timeout, or a guest that runs longer",
            "verdict": "undecided: no KVM call failed and no KVM_RUN was seen"}


# ---------------------------------------------------------------------------------------------
# the run

def qemu_argv(qb: QemuBinary, cfg: TraceConfig, serial: Path) -> list[str]:
    """The traced qemu's command line: headless, bounded, nothing on the network."""
    if cfg.accel == "auto":
        accel = [] if qb.qemu_kvm else qb.accel_args("kvm")
    else:
        accel = qb.accel_args(cfg.accel)
    return [str(qb.path), "-M", "pc", "-m", str(cfg.memory), "-smp", "1", *accel,
            *qb.display_args, "-monitor", "null", "-serial", f"file:{serial}",
            "-parallel", "none", "-net", "none", "-no-reboot", *cfg.guest_args,
            *cfg.extra_args]


def _run_strace(argv: list[str], log: Path, err: Path, timeout: float) -> tuple[int | None, bool]:
    """strace over argv, output to ``log``; (exit status, timed out). Its group is killed
    however this ends."""
    with open(err, "wb") as ferr:
        p = proc.spawn(["strace", *STRACE_ARGS, "-o", str(log), *argv],
                       stdout=proc.DEVNULL, stderr=ferr)
    try:
        rc = p.wait(timeout=timeout)
        return rc, False
    except proc.TimeoutExpired:
        return None, True
    finally:
        proc.kill_group(p)


def _check_strace_ran(log: Path, err: Path, rc: int | None) -> None:
    if log.is_file() and log.stat().st_size > 0:
        return
    said = err.read_text(errors="replace").strip().splitlines()[-2:] if err.is_file() else []
    raise HostError("strace did not trace qemu" + (f" (exit status {rc})" if rc else ""),
                    hint=("strace said: " + " | ".join(said)) if said else
                    "run `strace -f true` to see whether ptrace is allowed here")


def trace_kvm(cfg: TraceConfig) -> TraceReport:
    """Run qemu once under strace (see the module docstring) and read the trace."""
    qb = probe_qemu(cfg.qemu)
    with tempfile.TemporaryDirectory(prefix="kvmlab-trace-") as tmp:
        d = Path(tmp)
        argv = qemu_argv(qb, cfg, d / "serial.log")
        rc, timed_out = _run_strace(argv, d / "strace.log", d / "strace.err", cfg.timeout)
        _check_strace_ran(d / "strace.log", d / "strace.err", rc)
        text = (d / "strace.log").read_text(errors="replace")
    events = parse(text)
    v = verdict(argv, events)
    first = _LINE_RE.match(text)
    rep = TraceReport(str(qb.path), qb.version, argv, kvm_requested(argv), v["status"],
                      v["verdict"], v["meaning"], v["check_next"], v["failing"], events, rc,
                      timed_out, int(first.group(1)) if first else None,
                      sum(1 for e in events if e.name == "KVM_RUN"))
    if timed_out:
        rep.verdict += f" (qemu was stopped after {cfg.timeout:g} s)"
    return rep
